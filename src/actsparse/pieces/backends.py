"""Backends: how a ``SparseLinear`` computes its products, each one registered piece.

A backend says what it refuses for a config (``refusal``), prepares a layer's weights once
(``prepare``, again after learned corrections are folded), lets the layer compute from what it
prepared while the layer is in the model (``attach``; ``detach`` gives the weights their own layout
back when it leaves), runs the dense product of calls that stay dense and the sparse product of
sparsified calls, and describes in one sentence how a set of layers runs (``actsparse info``). Add
one with a ``Backend`` subclass and ``BACKENDS.register(MyBackend())``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from actsparse import kernels
from actsparse.core.errors import ActsparseError
from actsparse.core.registry import Registry

if TYPE_CHECKING:
    from actsparse.config import SparsityConfig
    from actsparse.sparse.layer import SparseCall, SparseLinear


class Backend:
    """The emulated product: dropped inputs are zeroed and the product is dense (any dtype, any
    device). Subclasses replace what they compute differently and fall back to this otherwise."""

    name: ClassVar[str]
    description: ClassVar[str]

    def refusal(self, config: SparsityConfig) -> str | None:
        """Why this backend cannot run ``config`` (a clause completing "The <name> backend ..."),
        or None."""
        return None

    def dtype_refusal(self, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot compute a model in ``dtype`` on ``device`` (a sentence naming
        the fix), or None; asked before a model loads and again when a layer is prepared."""
        return None

    def prepare(self, layer: SparseLinear) -> Any:
        """What this backend keeps for ``layer`` (e.g. packed weights), stored as ``layer.prepared``."""
        return None

    def attach(self, layer: SparseLinear) -> None:
        """``layer`` goes into the model (after ``prepare``, and at every ``handle.attach()``)."""

    def detach(self, layer: SparseLinear) -> None:
        """``layer`` leaves the model (``handle.remove()``): the original module gets its weight
        back exactly as it was."""

    def dense(self, layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        """A call that stays dense: the layer's own (smoothed, quantised) weight and bias."""
        return F.linear(layer.quantized(x), layer.weight, layer.bias)

    def sparse(self, layer: SparseLinear, call: SparseCall) -> torch.Tensor:
        """A sparsified call: select, let the corrections change the kept values, multiply, add
        ``η · row_sum`` for the shift."""
        kept = layer.sparsify_input(call.input, call.factor)
        for correction in layer.corrections:
            kept = correction.kept_values(layer, call, kept)
        operands = layer.operands()
        y = F.linear(layer.quantized(kept), operands.weight, operands.bias)
        return y if call.eta is None else y + call.eta * operands.row_sum

    def execution(self, layers: list[SparseLinear]) -> str:
        """How ``layers`` are computed, in one sentence."""
        selection = (
            f"selection compiled for float32 N:M on the CPU, {kernels.select_isa()}"
            if kernels.AVAILABLE
            else "selection in PyTorch: the compiled extension was not built"
        )
        return f"{self.name}: dropped inputs are zeroed and multiplied densely ({selection})."


BACKENDS: Registry[Backend] = Registry("backend")
"""The backends by name."""


class Emulated(Backend):
    name: ClassVar[str] = "emulated"
    description: ClassVar[str] = "zero the dropped inputs, multiply densely (any dtype, any device)"


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

    def refusal(self, config: SparsityConfig) -> str | None:
        for pattern in config.layer_patterns:
            if pattern.unstructured:
                return "runs N:M patterns only; choose an N:M pattern"
            if not pattern.dense and pattern.m > kernels.MAX_GROUP:
                return f"takes M up to {kernels.MAX_GROUP}; choose a smaller group"
        if config.quant != "none":
            return "computes in float32 and does not quantise; drop quant='w8a8'"
        for correction in config.mitigation:
            if correction.rescales_kept:
                return f"does not rescale the kept values; drop the {correction.name} mitigation"
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

    def prepare(self, layer: SparseLinear) -> kernels.PackedLinear | None:
        operands = layer.operands()
        weight = operands.weight
        if refusal := self.dtype_refusal(weight.dtype, weight.device):
            raise ActsparseError(refusal)
        if not layer.sparse or layer.offloaded or not kernels.packs(weight):
            return None
        return kernels.pack_linear(operands.weight, operands.bias, operands.row_sum)

    def attach(self, layer: SparseLinear) -> None:
        if layer.prepared is None:
            return
        view = layer.prepared.weight
        if layer.sparse_weight is not None:
            layer.sparse_weight = view
        elif layer.weight.data_ptr() != view.data_ptr():
            layer.weight.data = view
            layer.weight_is_view = True

    def detach(self, layer: SparseLinear) -> None:
        if layer.weight_is_view:
            layer.weight.data = layer.weight.data.contiguous()
            layer.weight_is_view = False

    def sparse(self, layer: SparseLinear, call: SparseCall) -> torch.Tensor:
        n, m = layer.pattern.keep_count(layer.in_features)
        if (
            layer.prepared is None
            or not kernels.runs(call.input, m, layer.prepared)
            or any(c.rescales_kept_values(layer) for c in layer.corrections)
        ):
            return super().sparse(layer, call)
        if call.input.dtype == torch.float32:
            factor = layer.criterion.channel_factor(call.input, call.factor)
            y, compressed = kernels.sparse_linear(call.input, layer.prepared, n, m, factor, call.eta)
        else:  # scores rounded as the emulated path rounds them, so that the same inputs are kept
            scores = layer.criterion.score(call.input, call.factor)
            y, compressed = kernels.sparse_linear(
                call.input, layer.prepared, n, m, eta=call.eta, scores=scores
            )
        if compressed.has_nan:
            raise layer.nan_error()
        layer.count_kept(compressed.nonzero, call.input.numel())
        return y

    def execution(self, layers: list[SparseLinear]) -> str:
        packed = sum(layer.prepared is not None for layer in layers)
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

get_backend = BACKENDS.get
"""Look a backend up by name; an unknown name is refused with the list of known ones."""
