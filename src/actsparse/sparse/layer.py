"""``SparseLinear``: an ``nn.Linear`` whose input is made N:M sparse before the matrix product."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from actsparse import kernels
from actsparse.config import SparsityConfig
from actsparse.core.devices import carry_hook, materialized, offloaded
from actsparse.core.errors import ActsparseError
from actsparse.core.ops import apply_pattern
from actsparse.core.patterns import Pattern
from actsparse.core.quant import quantize_activation, quantize_weight
from actsparse.core.registry import Piece
from actsparse.kernels import triton_select
from actsparse.pieces.base import BACKENDS, CRITERIA, Backend, Operands, SparseCall
from actsparse.sparse.density import DensityCounter

BACKEND_STATE = "backend"
"""The key of the backend's state among a layer's ``states`` (the corrections' keys are their names)."""


class SparseLinear(nn.Linear):
    """Drop-in replacement for one ``nn.Linear``; without smoothing or quantisation it shares the
    original's weight and bias Parameters, so the model's ``state_dict`` keeps its keys and values
    (learned corrections add their own ``states.learnable.*`` entries, and once folded the layer
    holds a second, corrected weight for sparsified calls).

    What each correction and the backend derive for the layer is their own state object, held in
    one place, ``states`` (an ``nn.ModuleDict`` by piece name, so it moves with the model), and read
    with ``state(piece)``; the pieces change the layer only through its methods.

    ``forward`` reads as corrections → backend → corrections: every call passes the corrections'
    ``every_call`` (smoothing); a dense call (decode, under the prefill phase, or a layer a policy
    skipped) is the backend's dense product; a sparsified call passes the corrections'
    ``before_selection``, the backend's sparse product (selection, the corrections' ``kept_values``,
    the product with bias and ``η · W.sum(1)``), and the corrections' ``after_product``. Build it
    with ``SparseLinear(linear, name, config)``; ``handle.remove()`` puts the original module back.
    """

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        config: SparsityConfig,
        statistics: dict[str, torch.Tensor] | None = None,
        pattern: Pattern | None = None,
    ) -> None:
        """Wrap ``linear`` (named ``name`` in its model) after checking the pattern fits it.

        ``statistics`` are this layer's calibration statistics (``{"input_max": ...}`` for
        smoothing); ``pattern`` is this layer's own (``config.pattern`` when None; a layer a policy
        leaves out takes ``config.rest_pattern``), and a dense one wraps a layer only for its
        smoothing and quantisation.
        """
        pattern = config.parsed_pattern if pattern is None else pattern
        if (
            not pattern.dense
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
        self.sparse = not pattern.dense
        self.pattern = pattern
        self.criterion = CRITERIA.get(config.criterion)
        self.backend = BACKENDS.get(config.backend)
        self.corrections = sorted(config.corrections, key=lambda c: c.stage)
        self.sparsify_single_token = config.phase == "all"
        self.quantize = config.quant == "w8a8" and not any(re.search(e, name) for e in config.quant_exclude)
        # An offloaded layer (accelerate's device_map) has its weights loaded for the build, then
        # again for each call, by the hook it takes over from the original.
        self.offloaded = offloaded(linear)
        with materialized(linear):
            self._derive_operands(linear, statistics)
            own = {} if self.weight is linear.weight else {"weight": self.weight}
        carry_hook(linear, self, own)
        self.density: DensityCounter | None = None

    def _derive_operands(self, linear: nn.Linear, statistics: dict[str, torch.Tensor] | None) -> None:
        """The weight (transformed by the corrections, quantised), bias, criterion factor and the
        corrections' states of this layer, and the backend's state prepared from them."""
        self.states = nn.ModuleDict()
        weight, statistics = linear.weight, statistics or {}
        for correction in self.corrections:
            derived = correction.derive(self, weight, statistics)
            weight, statistics = derived.weight, derived.statistics or statistics
            if derived.state is not None:
                self.states[correction.name] = derived.state
        factor = None
        if self.criterion.weight_factor is not None:
            factor = self.criterion.weight_factor(weight).to(linear.weight.dtype)
        if self.quantize:
            weight = quantize_weight(weight.detach())
        self.weight = weight if weight is linear.weight else nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.register_buffer("channel_factor", factor, persistent=False)
        # The +η part of prune(x − η) + η: η times the row sums of W (``add_row_sums``, for the shift).
        self.register_buffer("row_sum", None, persistent=False)
        # A separate weight and bias for sparsified calls, once learned corrections are folded.
        self.register_buffer("sparse_weight", None, persistent=False)
        self.register_buffer("sparse_bias", None, persistent=False)
        self.weight_is_view = False  # True while the weight Parameter is a view of a backend's storage
        for correction in self.corrections:
            correction.attach(self)
        self._prepare_backend()  # layer by layer, so that at most one extra weight copy exists at once

    def _prepare_backend(self) -> None:
        """The backend's state from the current operands, and the layer handed to it."""
        if BACKEND_STATE in self.states:
            del self.states[BACKEND_STATE]
        prepared = self.backend.prepare(self)
        if prepared is not None:
            self.states[BACKEND_STATE] = prepared
        self.backend.attach(self)

    def state(self, piece: Piece | Backend | str) -> Any:
        """What ``piece`` (a correction, the backend, or a correction's name) derived for this
        layer, or None."""
        if isinstance(piece, Backend):
            key = BACKEND_STATE
        else:
            key = piece if isinstance(piece, str) else piece.name
        return self.states[key] if key in self.states else None

    def operands(self) -> Operands:
        """The weight, bias, row sums and criterion factor of a sparsified call."""
        if self.sparse_weight is None:
            return Operands(self.weight, self.bias, self.row_sum, self.channel_factor)
        return Operands(self.sparse_weight, self.sparse_bias, self.row_sum, self.channel_factor)

    def add_row_sums(self) -> None:
        """Keep the row sums of the weight for the ``η · W.sum(1)`` of a per-token shift."""
        self.row_sum = self.weight.detach().sum(dim=1)

    def set_sparse_operands(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        row_sum: torch.Tensor | None,
        factor: torch.Tensor | None,
    ) -> None:
        """Give sparsified calls their own operands (folded corrections); the backend re-prepares."""
        self.sparse_weight, self.sparse_bias = weight, bias
        self.row_sum, self.channel_factor = row_sum, factor
        self._prepare_backend()

    def use_weight_view(self, view: torch.Tensor) -> None:
        """Let the sparse-call weight be ``view`` (a backend's storage of the same values), so that
        one copy is held: the folded sparse-call weight, or else the weight Parameter itself."""
        if self.sparse_weight is not None:
            self.sparse_weight = view
        elif self.weight.data_ptr() != view.data_ptr():
            self.weight.data = view
            self.weight_is_view = True

    def restore_weight_layout(self) -> None:
        """Give the weight Parameter its own contiguous storage again, if it is a backend's view
        (the layer leaves the model, and the original module gets its weight back as it was)."""
        if self.weight_is_view:
            self.weight.data = self.weight.data.contiguous()
            self.weight_is_view = False

    @property
    def folded(self) -> bool:
        """True when the sparsified calls use folded corrections (inference form)."""
        return self.sparse_weight is not None

    def fold(self) -> None:
        """Fold what the corrections learned into this layer's sparse-call operands (after
        calibration, or after loading a recipe's tensors)."""
        with materialized(self):
            for correction in self.corrections:
                correction.fold(self)

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
        """Share of non-zero inputs over the sparsified calls while density is counted."""
        return None if self.density is None else self.density.density

    def count_density(self, counter: DensityCounter | None) -> None:
        """Count the kept inputs of every sparsified call into ``counter`` (None: stop counting)."""
        self.density = counter

    def count_kept(self, kept: int, seen: int) -> None:
        """Add one sparsified call's kept and seen inputs, while density is being counted."""
        if self.density is not None:
            self.density.add(kept, seen)

    def sparsify_input(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor:
        """The N:M-sparse version of ``x`` (``(..., in)``) under this layer's pattern and criterion,
        with ``weight_factor`` the criterion's static per-channel factor.

        Float32 N:M on the CPU goes through the fused compiled pass when it is built, and so do
        bfloat16 and float16 where it has AVX-512 (M up to 32); elsewhere bfloat16 and float16 N:M
        on the CPU compute their scores in PyTorch and rank them with the compiled pass;
        N:M with M a power of two on CUDA goes through the fused Triton pass; every other case
        (other devices, unstructured patterns, gradients) goes through PyTorch operations. All keep
        exactly the same entries.
        """
        n, m = self.pattern.keep_count(self.in_features)
        kept = None
        if n >= m:
            sparse = x
        elif not self.pattern.unstructured and (
            kernels.supports(x, m)
            # in 16 bits, a score divided by the row norm (uses_batch) rounds differently
            or (not self.criterion.uses_batch and kernels.selects_16(x, m, weight_factor))
        ):
            factor = self.criterion.channel_factor(x, weight_factor)
            sparse, kept, has_nan = kernels.nm_select(x, factor, n, m)
            if has_nan:
                raise self.nan_error()
        elif not self.pattern.unstructured and kernels.ranks_scores(x, m):
            # scores rounded to x's dtype as below, ranked by the compiled pass
            scores = self.criterion.score(x.detach(), weight_factor)
            sparse, has_nan = kernels.nm_select_by_scores(x, scores, n, m)
            if has_nan:
                raise self.nan_error()
        elif not self.pattern.unstructured and triton_select.supports(x, m):
            if torch.isnan(x).any():
                raise self.nan_error()
            if self.criterion.uses_batch:  # scores that look at the whole call, computed here
                sparse = triton_select.nm_select(x, n, m, scores=self.criterion.score(x, weight_factor))
            else:
                sparse = triton_select.nm_select(
                    x, n, m, factor=self.criterion.channel_factor(x, weight_factor)
                )
        else:
            if torch.isnan(x).any():
                raise self.nan_error()
            sparse = apply_pattern(x, self.criterion.score(x.detach(), weight_factor), self.pattern)
        if self.density is not None:
            self.count_kept(int(torch.count_nonzero(sparse)) if kept is None else kept, sparse.numel())
        return sparse

    def nan_error(self) -> ActsparseError:
        return ActsparseError(
            f"Layer {self.name} received NaN activations, so no selection is possible; the model "
            "breaks before sparsification: load it in float32 or bfloat16 (float16 overflows) "
            "and check its inputs."
        )

    def is_prefill(self, x: torch.Tensor) -> bool:
        """True when the call processes more than one token per sequence."""
        return x.dim() >= 2 and x.shape[-2] > 1

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the per-token int8 grid when this layer is W8A8, else ``x``."""
        return quantize_activation(x) if self.quantize else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for correction in self.corrections:
            x = correction.every_call(self, x)
        if not (self.sparse and (self.sparsify_single_token or self.is_prefill(x))):
            return self.backend.dense(self, x)
        call = SparseCall(x, self.channel_factor)
        for correction in self.corrections:
            call = correction.before_selection(self, call)
        y = self.backend.sparse(self, call)
        for correction in reversed(self.corrections):
            y = correction.after_product(self, call, y)
        return y

    def extra_repr(self) -> str:
        sparsity = f"pattern={self.pattern}, criterion={self.criterion.name}" if self.sparse else "dense"
        corrections = self.config.corrections_name
        return (
            f"{super().extra_repr()}, {sparsity}, corrections={corrections}, w8a8={self.quantize}, "
            f"backend={self.backend.name}"
        )
