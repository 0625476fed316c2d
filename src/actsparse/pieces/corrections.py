"""Corrections of N:M activation sparsity, each one registered piece (the interface, per-call
hooks and lifecycle, is ``actsparse.pieces.base.Correction``). What a correction derives for a
layer (a smoothing scale, a channel order, learned vectors) is its own state object, held by the
layer as ``layer.state(correction)``.

Corrections run in their ``stage`` order; they are named, spelled (``"shift+var"``) and shown in
their registration order. Add one with a frozen dataclass subclass of ``Correction`` (its fields
are its settings) and ``@CORRECTIONS.register``; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from actsparse.core.errors import ActsparseError
from actsparse.core.quant import smoothing_scale
from actsparse.core.registry import setting
from actsparse.pieces.base import (
    CORRECTIONS,
    Correction,
    Derived,
    Fitter,
    Measuring,
    SparseCall,
    SparseLayer,
    SparsitySettings,
)


class Buffer(nn.Module):
    """A correction's state for one layer that is one tensor (a scale, an order), moved with the
    model; ``value`` is it."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value, persistent=False)


# ---- smoothing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Smoothing(Correction):
    """Per-input-channel scaling from calibration maxima: ``X / s`` and ``W · diag(s)``."""

    stage: ClassVar[int] = 0
    needs_calibration: ClassVar[bool] = True
    exclusive: ClassVar[str | None] = "smoothing"
    statistics: ClassVar[tuple[str, ...]] = ("input_max",)
    inverse: ClassVar[bool] = False
    smooth_alpha: float = 0.5

    def check(self, config: SparsitySettings) -> None:
        if not 0 <= self.smooth_alpha <= 1:
            raise ActsparseError(f"smooth_alpha {self.smooth_alpha:g} is outside [0, 1]; use e.g. 0.5.")

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measuring: Measuring
    ) -> dict[str, dict[str, torch.Tensor]]:
        return measuring.statistic("input_max", model, layers, f"{self.name} smoothing")

    def derive(
        self, layer: SparseLayer, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> Derived:
        scale = smoothing_scale(statistics["input_max"].to(weight.device), weight, self.smooth_alpha)
        scale = (1 / scale if self.inverse else scale).to(weight.dtype)
        seen = dict(statistics)  # later corrections see X / s
        if "input_mean_square" in seen:
            seen["input_mean_square"] = seen["input_mean_square"].to(weight.device) / scale.float().square()
        # W · diag(s): columns scaled, X / s keeps X Wᵀ
        return Derived(weight.detach() * scale, Buffer(scale), seen)

    def every_call(self, layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
        return x / layer.state(self).value


@CORRECTIONS.register
@dataclass(frozen=True)
class SmoothQuant(_Smoothing):
    """SmoothQuant's ``s = max|X|^α / max|W|^(1−α)`` (α 0.5: ``sqrt(max|X| / max|W|)``)."""

    name: ClassVar[str] = "smoothquant"
    description: ClassVar[str] = "static scaling s = max|X|^α / max|W|^(1−α), X/s and W·diag(s)"
    smooth_alpha: float = setting(0.5, "α of the smoothing scale (smoothquant 0.5, outstanding 0.1).")


@CORRECTIONS.register
@dataclass(frozen=True)
class Outstanding(_Smoothing):
    """Outstanding-sparse: the inverse of SmoothQuant's scale, which widens the activation range."""

    name: ClassVar[str] = "outstanding"
    description: ClassVar[str] = "Outstanding-sparse: the inverse smoothing scale (α 0.1)"
    inverse: ClassVar[bool] = True
    smooth_alpha: float = setting(0.1, "α of the smoothing scale (smoothquant 0.5, outstanding 0.1).")


# ---- channel order -----------------------------------------------------------------------------


def balanced_groups(importance: torch.Tensor, m: int) -> torch.Tensor:
    """An order of a layer's input channels in which every group of ``m`` consecutive positions
    holds channels of every rank of ``importance``: from most to least important, the channels
    are dealt across the groups back and forth (groups 0, 1, …, G−1, then G−1, …, 0, and so on).
    When the width is not a multiple of ``m`` the ``width % m`` most important channels take the
    tail, which stays dense."""
    groups, tail = divmod(importance.numel(), m)
    ranked = importance.argsort(descending=True, stable=True)
    rounds = ranked[tail:].reshape(m, groups).clone()  # round r deals ranks r·G … r·G + G − 1
    rounds[1::2] = rounds[1::2].flip(-1)
    return torch.cat([rounds.t().flatten(), ranked[:tail]])


@CORRECTIONS.register
@dataclass(frozen=True)
class Permute(Correction):
    """Choose which inputs share a group of M: each sparse layer's input channels are reordered
    (``x[..., order]``, and the weight's columns with them, so every product is unchanged) so that
    each group mixes channels that are typically large with ones that are typically small, ranked
    by their mean squared selection score on calibration text (``balanced_groups``). In the
    model's own order, neighbouring channels that are both large compete for the same N places."""

    name: ClassVar[str] = "permute"
    description: ClassVar[str] = "reorder input channels so each group of M mixes large and small ones"
    stage: ClassVar[int] = 5
    needs_calibration: ClassVar[bool] = True
    statistics: ClassVar[tuple[str, ...]] = ("input_mean_square",)

    def check(self, config: SparsitySettings) -> None:
        if any(pattern.unstructured for pattern in config.layer_patterns):
            raise ActsparseError(
                "The permute correction chooses the groups of an N:M pattern and unstructured "
                "sparsity has none; choose an N:M pattern or drop permute."
            )

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measuring: Measuring
    ) -> dict[str, dict[str, torch.Tensor]]:
        return measuring.statistic("input_mean_square", model, layers, "permute statistics")

    def derive(
        self, layer: SparseLayer, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> Derived:
        if not layer.sparse:
            return Derived(weight)
        mean_square = statistics["input_mean_square"].to(weight.device)  # as selection sees the input
        weight_factor = layer.criterion.weight_factor
        if weight_factor is not None:
            mean_square = mean_square * weight_factor(weight).square()
        order = balanced_groups(mean_square, layer.pattern.m)
        return Derived(weight.detach()[:, order], Buffer(order))

    def every_call(self, layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
        order = layer.state(self)
        return x if order is None else x[..., order.value]


# ---- training-free corrections of each token ---------------------------------------------------


def shift_value(x: torch.Tensor, statistic: str) -> torch.Tensor:
    """η of the shift correction: each token's median (or mean) input, ``(..., 1)``."""
    if statistic == "mean":
        return x.mean(dim=-1, keepdim=True)
    return x.median(dim=-1, keepdim=True).values


def variance_restored(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """``sparse`` scaled per token by ``sqrt(Var(dense) / Var(sparse))`` (rows of zeros kept)."""
    ratio = dense.float().var(dim=-1, keepdim=True) / sparse.float().var(dim=-1, keepdim=True)
    return sparse * torch.nan_to_num(ratio, nan=1.0, posinf=1.0).sqrt().to(sparse.dtype)


SHIFT_STATISTICS = ("median", "mean")


@CORRECTIONS.register
@dataclass(frozen=True)
class Shift(Correction):
    """Select on ``x − η`` (η the token's median or mean) and add ``η · W.sum(1)`` to the output:
    a per-token scalar times a fixed vector, no dense product."""

    name: ClassVar[str] = "shift"
    description: ClassVar[str] = "select on x − η (token median or mean), add η · W.sum(1) back"
    stage: ClassVar[int] = 20
    shift_statistic: str = setting("median", "Shift correction: η is each token's median or mean input.")

    def check(self, config: SparsitySettings) -> None:
        if self.shift_statistic not in SHIFT_STATISTICS:
            raise ActsparseError(f"Unknown shift statistic '{self.shift_statistic}'; choose median or mean.")

    def attach(self, layer: SparseLayer) -> None:
        layer.add_row_sums()

    def before_selection(self, layer: SparseLayer, call: SparseCall) -> SparseCall:
        eta = shift_value(call.input, self.shift_statistic)
        return replace(call, input=call.input - eta, eta=eta)


@CORRECTIONS.register
@dataclass(frozen=True)
class RestoreVariance(Correction):
    """Rescale the kept values so each token keeps the variance of its dense input."""

    name: ClassVar[str] = "var"
    description: ClassVar[str] = "rescale the kept values to the token's dense variance"
    stage: ClassVar[int] = 30
    rescales_kept: ClassVar[bool] = True

    def kept_values(self, layer: SparseLayer, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
        return variance_restored(call.input, kept)


# ---- learned per-channel corrections -----------------------------------------------------------


@dataclass(frozen=True)
class FoldedLayer:
    """What a sparsified call multiplies with once the learned corrections are folded in."""

    weight: torch.Tensor
    bias: torch.Tensor
    row_sum: torch.Tensor
    channel_factor: torch.Tensor


class LearnedCorrection(nn.Module):
    """Calibrated corrections of one layer, all per channel; at initialisation they do nothing.

    With ``v = x − shift`` (and, under the training-free shift, ``v − η``) a sparsified call computes::

        y = ((prune(v) ⊙ scale + shift + η) Wᵀ + b) ⊙ (1 + output_scale) + output_bias

    i.e. the dropped inputs are replaced by ``shift`` (learnable shift), the kept ones are scaled
    per channel (learnable diagonal scale, which also multiplies the selection score), and the
    output is corrected per channel (``Y(1 + a) + b``). ``fold`` turns all of it into one weight,
    bias and channel factor, so inference only subtracts ``shift`` before the usual selection.
    ``learn`` names the parts calibration fits (``PARTS``, joined with ``+``); the rest stay neutral.
    """

    TENSORS = ("scale", "shift", "output_scale", "output_bias")
    PARTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "input": ("scale", "shift"),
        "output": ("output_scale", "output_bias"),
    }

    def __init__(
        self,
        in_features: int,
        out_features: int,
        learn: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.learn = learn
        # Trainable only while calibration fits them (``actsparse.calibration.fitting``).
        like = {"dtype": dtype, "device": device}
        self.scale = nn.Parameter(torch.ones(in_features, **like), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(in_features, **like), requires_grad=False)
        self.output_scale = nn.Parameter(torch.zeros(out_features, **like), requires_grad=False)
        self.output_bias = nn.Parameter(torch.zeros(out_features, **like), requires_grad=False)
        self.folded = False

    def learned_parameters(self) -> list[nn.Parameter]:
        """The tensors calibration fits: those of the parts in ``learn`` (the others stay neutral)."""
        return [getattr(self, name) for part in self.learn.split("+") for name in self.PARTS[part]]

    def selection_factor(self, factor: torch.Tensor | None) -> torch.Tensor:
        """The criterion's per-channel factor times ``|scale|``: selection sees the scaled input."""
        magnitude = self.scale.detach().abs()
        return magnitude if factor is None else factor * magnitude

    @torch.no_grad()
    def fold(
        self, weight: torch.Tensor, bias: torch.Tensor | None, channel_factor: torch.Tensor | None
    ) -> FoldedLayer:
        """One weight ``diag(1 + a) W diag(scale)``, bias ``(1 + a)(b + W·shift) + output_bias``, the
        row sums ``(1 + a) W.sum(1)`` for the per-token η, and the selection factor; from then on
        the per-call hooks leave the folded operands to the layer."""
        self.folded = True
        gain = 1 + self.output_scale
        base_bias = weight @ self.shift if bias is None else bias + weight @ self.shift
        return FoldedLayer(
            weight=(gain[:, None] * weight * self.scale).contiguous(),
            bias=gain * base_bias + self.output_bias,
            row_sum=gain * weight.sum(dim=1),
            channel_factor=self.selection_factor(channel_factor).contiguous(),
        )


@dataclass(frozen=True)
class Objective:
    """Optimiser defaults of one objective: peak learning rate and passes over the windows."""

    lr: float
    passes: int
    lr_with_output: float | None = None
    """The peak learning rate when the output vectors are fitted too (``learn="input+output"``),
    where it differs from ``lr``."""

    def lr_for(self, learn: str) -> float:
        """The peak learning rate for fitting the parts ``learn`` names (a ``learnable`` setting)."""
        return self.lr_with_output if learn == "input+output" and self.lr_with_output else self.lr


OBJECTIVES = {
    "block-mse": Objective(lr=5e-3, passes=1),
    "block-normed": Objective(lr=5e-3, passes=1),
    # Every vector of every layer moves at once. Fitting the output scale and bias too takes a
    # lower rate; docs/quality.md ("The learning rate of the end-to-end fit") has the measurements
    # behind both rates.
    "output-kl": Objective(lr=1e-3, passes=2, lr_with_output=1e-4),
}
"""What learnable corrections are fitted to (the ``objective`` setting; ``actsparse.calibration.fitting``
describes each), by name."""

LEARNABLE_PARTS = ("input", "input+output")
"""What learnable corrections may fit (``Learnable.learn``)."""


@CORRECTIONS.register
@dataclass(frozen=True)
class Learnable(Correction):
    """Per-channel input shift and scale (and, with ``learn="input+output"``, output scale and bias),
    fitted on calibration text (``actsparse.calibration.fitting``) and folded into the layer's
    weight, bias and selection factor. Its state in each sparse layer is a ``LearnedCorrection``."""

    name: ClassVar[str] = "learnable"
    description: ClassVar[str] = "calibrated per-channel input shift/scale (and output scale/bias), folded"
    # Recipes and results saved before ``learn`` existed fitted the output scale and bias too.
    absent_means: ClassVar[dict[str, Any]] = {"learn": "input+output"}
    stage: ClassVar[int] = 10
    needs_calibration: ClassVar[bool] = True
    learned: ClassVar[bool] = True

    objective: str = setting(
        "output-kl",
        "Learnable corrections are fitted to: output-kl (the KL of the model's next-token distribution, "
        "all layers together), block-mse (each block's output, one block at a time), or block-normed "
        "(each block's output after the norm that reads it next).",
    )
    learn: str = setting(
        "input",
        "Learnable corrections fit: input (the input shift and scale, as in the mitigation study) or "
        "input+output (with an output scale and bias too).",
    )

    def check(self, config: SparsitySettings) -> None:
        if self.objective not in OBJECTIVES:
            raise ActsparseError(
                f"Unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}."
            )
        if self.learn not in LEARNABLE_PARTS:
            raise ActsparseError(f"Unknown learn='{self.learn}'; choose one of {', '.join(LEARNABLE_PARTS)}.")
        if any(c.rescales_kept for c in config.corrections):
            raise ActsparseError(
                "Corrections var+learnable are not supported: the learned per-channel scale already "
                "restores the kept values' size; use learnable or shift+learnable."
            )
        if config.quant != "none":
            raise ActsparseError(
                "Learnable corrections are calibrated without quantisation and cannot be combined "
                "with quant='w8a8' yet; use a training-free correction with W8A8."
            )

    def derive(
        self, layer: SparseLayer, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> Derived:
        if not layer.sparse:
            return Derived(weight)
        shape = (layer.in_features, layer.out_features)
        return Derived(weight, LearnedCorrection(*shape, self.learn, weight.dtype, weight.device))

    def _live(self, layer: SparseLayer) -> LearnedCorrection | None:
        """The layer's correction while it is not folded yet (calibration's differentiable form)."""
        state = layer.state(self)
        return None if state is None or state.folded else state

    def before_selection(self, layer: SparseLayer, call: SparseCall) -> SparseCall:
        state = layer.state(self)
        if state is None:
            return call
        # folded, the factor already holds |scale|
        factor = call.factor if state.folded else state.selection_factor(call.factor)
        return replace(call, input=call.input - state.shift, factor=factor)

    def rescales_kept_values(self, layer: SparseLayer) -> bool:
        return self._live(layer) is not None

    def kept_values(self, layer: SparseLayer, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
        state = self._live(layer)
        return kept if state is None else kept * state.scale + state.shift

    def after_product(self, layer: SparseLayer, call: SparseCall, y: torch.Tensor) -> torch.Tensor:
        state = self._live(layer)
        return y if state is None else y * (1 + state.output_scale) + state.output_bias

    def fit(self, layers: dict[str, SparseLayer], fitter: Fitter) -> dict[str, Any]:
        parameters = {
            name: state.learned_parameters()
            for name, layer in layers.items()
            if (state := layer.state(self)) is not None
        }
        return fitter.fit(parameters, self.objective, self.learn)

    def calibration_label(self, record: dict[str, Any]) -> list[str]:
        lr = record.get("settings", {}).get("lr")
        if lr is None or lr == OBJECTIVES[self.objective].lr_for(self.learn):
            return []
        return ["lr=" + ",".join(f"{rate:g}" for rate in (lr if isinstance(lr, list) else [lr]))]

    def fold(self, layer: SparseLayer) -> None:
        state = layer.state(self)
        if state is None:
            return
        folded = state.fold(layer.weight, layer.bias, layer.channel_factor)
        layer.set_sparse_operands(
            folded.weight,
            folded.bias,
            folded.row_sum if layer.row_sum is not None else None,
            folded.channel_factor,
        )

    def save_tensors(self, layer: SparseLayer) -> dict[str, torch.Tensor]:
        state = layer.state(self)
        if state is None:
            return {}
        return {f"correction.{name}": p.detach() for name, p in state.named_parameters()}

    def load_tensors(self, layer: SparseLayer, tensors: dict[str, torch.Tensor]) -> None:
        state = layer.state(self)
        if state is None:
            return
        for name, parameter in state.named_parameters():
            parameter.copy_(tensors[f"correction.{name}"])
        self.fold(layer)
