"""``SparseLinear``: an ``nn.Linear`` whose input is made N:M sparse before the matrix product."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from actsparse import kernels
from actsparse.config import SparsityConfig
from actsparse.criteria import get_criterion
from actsparse.errors import ActsparseError
from actsparse.mitigation import LearnedCorrection, shift_value, variance_restored
from actsparse.ops import apply_pattern
from actsparse.quant import quantize_activation, quantize_weight, smoothing_scale


class SparseLinear(nn.Linear):
    """Drop-in replacement for one ``nn.Linear``; without smoothing or quantisation it shares the
    original's weight and bias Parameters, so the model's ``state_dict`` keeps its keys and values
    (learned corrections add their own ``correction.*`` entries, and once folded the layer holds a
    second, corrected weight for sparsified calls).

    The forward pass is: divide by the smoothing scale (if any); in a sparsified call, subtract the
    learned per-channel shift (if learnable) and the token's shift η (if shift), keep the top N of
    every M inputs, restore the token's variance (if var); quantise the activations per token (if
    W8A8); multiply by the (smoothed, quantised, or learned-and-folded) weight; add ``η · W.sum(1)``
    (if shift). Dense calls (decode, under the prefill phase) use the layer's own weight without
    learned corrections. Build it with ``SparseLinear(linear, name, config)``; ``handle.remove()``
    puts the original module back.

    Under ``backend="cpu-kernel"`` the layer also holds its sparse-call weight packed for the
    compiled sparse GEMM (a second copy of the weight), and a sparsified float32 call on the CPU
    selects, multiplies only the kept inputs and adds bias and ``η · W.sum(1)`` in compiled code.
    """

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        config: SparsityConfig,
        input_max: torch.Tensor | None = None,
        sparse: bool = True,
    ) -> None:
        """Wrap ``linear`` (named ``name`` in its model) after checking the pattern fits it.

        ``input_max`` (per-channel ``max |X|`` on calibration text) is needed for smoothing;
        ``sparse=False`` wraps a layer only for its smoothing and quantisation.
        """
        pattern = config.parsed_pattern
        if (
            sparse
            and not pattern.unstructured
            and linear.in_features % pattern.m
            and config.remainder == "error"
        ):
            raise ActsparseError(
                f"Layer {name} has {linear.in_features} inputs, not a multiple of M={pattern.m} "
                f"(pattern {pattern}); choose an M that divides {linear.in_features}, or keep the last "
                f"{linear.in_features % pattern.m} inputs dense with remainder='dense' (--remainder dense)."
            )
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.name = name
        self.config = config
        self.sparse = sparse and not pattern.dense
        self.pattern = pattern
        self.criterion = get_criterion(config.criterion)
        self.sparsify_single_token = config.phase == "all"
        self.quantize = config.quant == "w8a8" and not any(re.search(e, name) for e in config.quant_exclude)
        weight, scale = linear.weight, None
        if config.smooth != "none":
            scale = smoothing_scale(input_max, linear.weight, config.smooth_alpha)
            scale = (1 / scale if config.smooth == "outstanding" else scale).to(linear.weight.dtype)
            weight = weight.detach() * scale  # W · diag(s): columns scaled, X / s keeps X Wᵀ
        self.register_buffer("input_scale", scale, persistent=False)
        factor = None
        if self.criterion.weight_factor is not None:
            factor = self.criterion.weight_factor(weight).to(linear.weight.dtype)
        self.register_buffer("channel_factor", factor, persistent=False)
        if self.quantize:
            weight = quantize_weight(weight.detach())
        self.shift = "shift" in config.corrections
        self.restore_variance = "var" in config.corrections
        # The +η part of prune(x − η) + η: η times the row sums of W, not a dense product.
        row_sum = weight.detach().sum(dim=1) if self.shift else None
        self.register_buffer("weight_row_sum", row_sum, persistent=False)
        self.correction = None
        if config.learnable and self.sparse:
            self.correction = LearnedCorrection(self.in_features, self.out_features, weight.dtype)
        for folded in ("folded_weight", "folded_bias", "folded_row_sum", "folded_factor"):
            self.register_buffer(folded, None, persistent=False)
        self.weight = weight if weight is linear.weight else nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.packed: kernels.PackedLinear | None = None
        if config.backend == "cpu-kernel" and self.sparse and kernels.AVAILABLE:
            self.packed = kernels.pack_linear(weight, linear.bias, row_sum)
        self.measure_density = False
        self.kept_inputs = 0
        self.seen_inputs = 0

    @property
    def nominal_density(self) -> float:
        """Share of inputs kept in a sparsified call, by construction."""
        if not self.sparse:
            return 1.0
        n, m = self.pattern.keep_count(self.in_features)
        body = self.in_features - self.in_features % m
        return (body // m * n + self.in_features - body) / self.in_features

    @property
    def measured_density(self) -> float | None:
        """Share of non-zero inputs over the sparsified calls since the counters were reset."""
        return self.kept_inputs / self.seen_inputs if self.seen_inputs else None

    def reset_counters(self) -> None:
        self.kept_inputs = self.seen_inputs = 0

    def sparsify_input(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor:
        """The N:M-sparse version of ``x`` (``(..., in)``) under this layer's pattern and criterion,
        with ``weight_factor`` the criterion's static per-channel factor.

        Float32 N:M on the CPU goes through the fused compiled pass when it is built; every other
        case (other dtypes, devices, unstructured patterns, gradients) through PyTorch operations.
        Both keep exactly the same entries.
        """
        n, m = self.pattern.keep_count(self.in_features)
        kept = None
        if n >= m:
            sparse = x
        elif not self.pattern.unstructured and kernels.supports(x, m):
            factor = self.criterion.channel_factor(x, weight_factor)
            sparse, kept, has_nan = kernels.nm_select(x, factor, n, m)
            if has_nan:
                raise self._nan_error()
        else:
            if torch.isnan(x).any():
                raise self._nan_error()
            sparse = apply_pattern(x, self.criterion.score(x.detach(), weight_factor), self.pattern)
        if self.measure_density:
            self.kept_inputs += int(torch.count_nonzero(sparse)) if kept is None else kept
            self.seen_inputs += sparse.numel()
        return sparse

    def _nan_error(self) -> ActsparseError:
        return ActsparseError(
            f"Layer {self.name} received NaN activations, so no selection is possible; the model "
            "breaks before sparsification: load it in float32 or bfloat16 (float16 overflows) "
            "and check its inputs."
        )

    def is_prefill(self, x: torch.Tensor) -> bool:
        """True when the call processes more than one token per sequence."""
        return x.dim() >= 2 and x.shape[-2] > 1

    def fold(self) -> None:
        """Fold the learned corrections into this layer's sparse-call weight, bias and factor
        (after calibration, or after loading a recipe's tensors)."""
        folded = self.correction.fold(self.weight, self.bias, self.channel_factor)
        self.folded_weight, self.folded_bias = folded.weight, folded.bias
        self.folded_row_sum, self.folded_factor = folded.row_sum, folded.channel_factor
        if self.packed is not None:
            self.packed = kernels.pack_linear(folded.weight, folded.bias, folded.row_sum)

    @property
    def folded(self) -> bool:
        """True when the learned corrections are folded (inference form)."""
        return self.folded_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        if not (self.sparse and (self.sparsify_single_token or self.is_prefill(x))):
            return F.linear(self._quantized(x), self.weight, self.bias)
        correction = self.correction
        if correction is not None:
            x = x - correction.shift
        eta = None
        if self.shift:
            eta = shift_value(x, self.config.shift_statistic)
            x = x - eta
        weight, bias, row_sum, factor = self.weight, self.bias, self.weight_row_sum, self.channel_factor
        if self.folded:
            weight, bias = self.folded_weight, self.folded_bias
            row_sum, factor = self.folded_row_sum, self.folded_factor
        elif correction is not None:
            factor = correction.selection_factor(factor)
        if self.packed is not None and (correction is None or self.folded):
            n, m = self.pattern.keep_count(self.in_features)
            if kernels.supports(x, m):
                return self._kernel_forward(x, factor, eta, n, m)
        sparse = self.sparsify_input(x, factor)
        if self.restore_variance:
            sparse = variance_restored(x, sparse)
        if correction is not None and not self.folded:
            return correction.unfolded(sparse, eta, self.weight, self.bias)
        y = F.linear(self._quantized(sparse), weight, bias)
        return y if eta is None else y + eta * row_sum

    def _kernel_forward(
        self, x: torch.Tensor, factor: torch.Tensor | None, eta: torch.Tensor | None, n: int, m: int
    ) -> torch.Tensor:
        """The sparsified call through the compiled sparse GEMM (bias and ``η · W.sum(1)`` inside)."""
        y, compressed = kernels.sparse_linear(
            x, self.packed, n, m, self.criterion.channel_factor(x, factor), eta
        )
        if compressed.has_nan:
            raise self._nan_error()
        if self.measure_density:
            self.kept_inputs += compressed.nonzero
            self.seen_inputs += x.numel()
        return y

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_activation(x) if self.quantize else x

    def extra_repr(self) -> str:
        sparsity = f"pattern={self.pattern}, criterion={self.criterion.name}" if self.sparse else "dense"
        return (
            f"{super().extra_repr()}, {sparsity}, smooth={self.config.smooth}, "
            f"mitigation={self.config.mitigation}, w8a8={self.quantize}, "
            f"backend={'cpu-kernel' if self.packed is not None else 'emulated'}"
        )
