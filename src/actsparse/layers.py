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
from actsparse.ops import apply_pattern
from actsparse.quant import quantize_activation, quantize_weight, smoothing_scale


class SparseLinear(nn.Linear):
    """Drop-in replacement for one ``nn.Linear``; without smoothing or quantisation it shares the
    original's weight and bias Parameters, so the model's ``state_dict`` keeps its keys and values.

    The forward pass is: divide by the smoothing scale (if any); in a sparsified call, subtract the
    token's shift η (if shift), keep the top N of every M inputs, restore the token's variance (if
    var); quantise the activations per token (if W8A8); multiply by the (smoothed, quantised)
    weight; add ``η · W.sum(1)`` (if shift). Build it with ``SparseLinear(linear, name, config)``;
    ``handle.remove()`` puts the original module back.
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
        self.weight = weight if weight is linear.weight else nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
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

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        """The N:M-sparse version of ``x`` (``(..., in)``) under this layer's pattern and criterion.

        Float32 N:M on the CPU goes through the fused compiled pass when it is built; every other
        case (other dtypes, devices, unstructured patterns, gradients) through PyTorch operations.
        Both keep exactly the same entries.
        """
        n, m = self.pattern.keep_count(self.in_features)
        kept = None
        if n >= m:
            sparse = x
        elif not self.pattern.unstructured and kernels.supports(x, m):
            factor = self.criterion.channel_factor(x, self.channel_factor)
            sparse, kept, has_nan = kernels.nm_select(x, factor, n, m)
            if has_nan:
                raise self._nan_error()
        else:
            if torch.isnan(x).any():
                raise self._nan_error()
            sparse = apply_pattern(x, self.criterion.score(x, self.channel_factor), self.pattern)
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

    def shift_value(self, x: torch.Tensor) -> torch.Tensor:
        """η of the shift correction: each token's median (or mean) input, ``(..., 1)``."""
        if self.config.shift_statistic == "mean":
            return x.mean(dim=-1, keepdim=True)
        return x.median(dim=-1, keepdim=True).values

    @staticmethod
    def variance_restored(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """``sparse`` scaled per token by ``sqrt(Var(dense) / Var(sparse))`` (rows of zeros kept)."""
        ratio = dense.float().var(dim=-1, keepdim=True) / sparse.float().var(dim=-1, keepdim=True)
        return sparse * torch.nan_to_num(ratio, nan=1.0, posinf=1.0).sqrt().to(sparse.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale
        shift = None
        if self.sparse and (self.sparsify_single_token or self.is_prefill(x)):
            if self.shift:
                shift = self.shift_value(x)
                x = x - shift
            sparse = self.sparsify_input(x)
            x = self.variance_restored(x, sparse) if self.restore_variance else sparse
        if self.quantize:
            x = quantize_activation(x)
        y = F.linear(x, self.weight, self.bias)
        return y if shift is None else y + shift * self.weight_row_sum

    def extra_repr(self) -> str:
        sparsity = f"pattern={self.pattern}, criterion={self.criterion.name}" if self.sparse else "dense"
        return (
            f"{super().extra_repr()}, {sparsity}, smooth={self.config.smooth}, "
            f"mitigation={self.config.mitigation}, w8a8={self.quantize}"
        )
