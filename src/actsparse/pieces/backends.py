"""Backends: how a ``SparseLinear`` computes its products, each one registered piece (the
interface is ``actsparse.pieces.base.Backend``). Add one with a ``Backend`` subclass and
``BACKENDS.register(MyBackend())``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from actsparse import kernels
from actsparse.core.errors import ActsparseError
from actsparse.pieces.base import BACKENDS, Backend, SparseCall, SparseLayer, SparsitySettings


class Emulated(Backend):
    name: ClassVar[str] = "emulated"
    description: ClassVar[str] = "zero the dropped inputs, multiply densely (any dtype, any device)"


class PackedWeights(nn.Module):
    """The cpu-kernel backend's state for one layer: the kernels' packed weight, bias and row sums."""

    def __init__(self, packed: kernels.PackedLinear) -> None:
        super().__init__()
        self.packed = packed


class CpuKernel(Backend):
    """actsparse's compiled products over the kept inputs only: a fused select-and-compress pass,
    then a sparse GEMM (prefill) or a sparse GEMV that reads only the kept inputs' weight rows
    (decode: at most ``kernels.GEMV_MAX_TOKENS`` tokens), float32 or bfloat16 (summed in float32),
    with bias and ``η · W.sum(1)`` inside (N:M, M ≤ 64, on the CPU).

    The weight is stored once: while the layer is in the model, its sparse-call weight is a view of
    the kernels' transposed storage, so dense calls (decode under ``phase="prefill"``) multiply the
    same bytes and no second copy is held; ``detach`` gives the original module a contiguous weight
    again, value for value. Other calls (float16, calls needing gradients, unfolded learned
    corrections) are emulated on the same view."""

    name: ClassVar[str] = "cpu-kernel"
    description: ClassVar[str] = (
        "multiply only the kept inputs (compiled sparse GEMM and GEMV, N:M on the CPU)"
    )

    def refusal(self, config: SparsitySettings) -> str | None:
        for pattern in config.layer_patterns:
            if pattern.unstructured:
                return "runs N:M patterns only; choose an N:M pattern"
            if not pattern.dense and pattern.m > kernels.MAX_GROUP:
                return f"takes M up to {kernels.MAX_GROUP}; choose a smaller group"
        if config.quant != "none":
            return "computes in float32 and does not quantise; drop quant='w8a8'"
        for correction in config.corrections:
            if correction.rescales_kept:
                return f"does not rescale the kept values; drop the {correction.name} correction"
        return None

    def dtype_refusal(self, dtype: torch.dtype, device: torch.device) -> str | None:
        if kernels.AVAILABLE and device.type == "cpu" and dtype not in kernels.WEIGHT_DTYPES:
            name = str(dtype).removeprefix("torch.")
            return (
                f"The cpu-kernel backend computes float32 or bfloat16, not {name} "
                "(it would run emulated under the cpu-kernel name); load the model with --dtype float32 or "
                "bfloat16, or use backend=emulated."
            )
        return None

    def prepare(self, layer: SparseLayer) -> PackedWeights | None:
        operands = layer.operands()
        weight = operands.weight
        if refusal := self.dtype_refusal(weight.dtype, weight.device):
            raise ActsparseError(refusal)
        if not layer.sparse or layer.offloaded or not kernels.packs(weight):
            return None
        return PackedWeights(kernels.pack_linear(operands.weight, operands.bias, operands.row_sum))

    def attach(self, layer: SparseLayer) -> None:
        state = layer.state(self)
        if state is not None:
            layer.use_weight_view(state.packed.weight)

    def detach(self, layer: SparseLayer) -> None:
        layer.restore_weight_layout()

    def sparse(self, layer: SparseLayer, call: SparseCall) -> torch.Tensor:
        n, m = layer.pattern.keep_count(layer.in_features)
        state = layer.state(self)
        if (
            state is None
            or not kernels.runs(call.input, m, state.packed)
            or any(c.rescales_kept_values(layer) for c in layer.corrections)
        ):
            return super().sparse(layer, call)
        if call.input.dtype == torch.float32:
            factor = layer.criterion.channel_factor(call.input, call.factor)
            y, compressed = kernels.sparse_linear(call.input, state.packed, n, m, factor, call.eta)
        else:  # scores rounded as the emulated path rounds them, so that the same inputs are kept
            scores = layer.criterion.score(call.input, call.factor)
            y, compressed = kernels.sparse_linear(
                call.input, state.packed, n, m, eta=call.eta, scores=scores
            )
        if compressed.has_nan:
            raise layer.nan_error()
        layer.count_kept(compressed.nonzero, call.input.numel())
        return y

    def execution(self, layers: list[SparseLayer]) -> str:
        packed = sum(layer.state(self) is not None for layer in layers)
        if packed:
            return (
                f"cpu-kernel: {packed} layers multiply only the kept inputs (sparse GEMM "
                f"{kernels.gemm_isa()} for prefill, sparse GEMV for calls of up to "
                f"{kernels.GEMV_MAX_TOKENS} tokens, float32 or bfloat16, selection "
                f"{kernels.select_isa()}) on the CPU, from one stored copy of each weight; other "
                "calls are emulated."
            )
        return (
            "emulated, although cpu-kernel was asked for: the compiled extension was not built "
            "(reinstall actsparse where a C compiler is present) or the weights are neither "
            "float32 nor bfloat16 on the CPU."
        )


BACKENDS.register(Emulated())
BACKENDS.register(CpuKernel())
