"""Corrections of N:M activation sparsity, each one registered piece.

A ``SparseLinear`` runs its corrections around the backend's sparse product::

    every call:       x = c.every_call(x)                  smoothing (X / s), channel order
    sparsified call:  c.before_selection(call)             learned shift, the token's shift η
                      kept = select(call.input)            (backend)
                      kept = c.kept_values(call, kept)     restored variance, learned scale
                      y = kept Wᵀ + b + η · W.sum(1)       (backend)
                      y = c.after_product(call, y)         learned output scale and bias

Corrections run in their ``stage`` order; they are named, spelled (``"shift+var"``) and shown in
their registration order. Add one with a frozen dataclass subclass of ``Correction`` (its fields
are its settings) and ``@CORRECTIONS.register``; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from actsparse.calibration.measure import Measurements, input_abs_max, input_mean_square
from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.quant import smoothing_scale
from actsparse.core.registry import Piece, Registry, setting

if TYPE_CHECKING:
    from actsparse.calibration.fitting import CalibrationSettings
    from actsparse.config import SparsityConfig
    from actsparse.sparse.handle import SparsityHandle
    from actsparse.sparse.layer import SparseCall, SparseLinear


@dataclass(frozen=True)
class Correction(Piece):
    """One correction; every hook does nothing unless a subclass says otherwise.

    Class attributes: ``stage`` (order of application), ``needs_calibration`` (measures or learns on
    calibration text), ``learned`` (fitted by ``calibrate``, so sensitivities are measured without
    it), ``rescales_kept`` (changes the kept values after selection, which fused kernels can't do),
    ``exclusive`` (at most one correction of this group per config), ``statistics`` (names of the
    per-layer tensors ``measure`` returns, one value per input channel, saved in recipes).
    """

    stage: ClassVar[int] = 50
    needs_calibration: ClassVar[bool] = False
    learned: ClassVar[bool] = False
    rescales_kept: ClassVar[bool] = False
    exclusive: ClassVar[str | None] = None
    statistics: ClassVar[tuple[str, ...]] = ()

    def check(self, config: SparsityConfig) -> None:
        """Refuse, with one sentence, a config this correction cannot be combined with."""

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measurements: Measurements
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer statistics from the dense model on calibration text (named in ``statistics``)."""
        return {}

    def transform_weight(
        self, layer: SparseLinear, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The layer's weight as this correction needs it (before quantisation)."""
        return weight

    def attach(self, layer: SparseLinear) -> None:
        """Give the layer what this correction holds (buffers, parameters); its weight is final."""

    def every_call(self, layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        return x

    def before_selection(self, layer: SparseLinear, call: SparseCall) -> None:
        """Change ``call.input``, ``call.factor`` or ``call.eta`` before the kept inputs are chosen."""

    def kept_values(self, layer: SparseLinear, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
        return kept

    def rescales_kept_values(self, layer: SparseLinear) -> bool:
        """True when ``kept_values`` changes anything for this layer now."""
        return self.rescales_kept

    def after_product(self, layer: SparseLinear, call: SparseCall, y: torch.Tensor) -> torch.Tensor:
        return y

    def calibrate(
        self, handle: SparsityHandle, windows: torch.Tensor | None, settings: CalibrationSettings
    ) -> dict[str, Any] | None:
        """Fit what this correction learns on the attached model; returns a JSON-ready record."""
        return None

    def calibration_label(self, record: dict[str, Any]) -> list[str]:
        """Words for table labels from a calibration ``record`` (what ``calibrate`` returned, or a
        recipe kept): how it was fitted where that differs from the defaults."""
        return []

    def fold(self, layer: SparseLinear) -> None:
        """Turn what was learned into the layer's sparse-call operands (inference form)."""

    def layer_tensors(self, layer: SparseLinear) -> dict[str, torch.Tensor]:
        """Tensors this correction holds in ``layer`` (saved in recipes as ``<layer>.<name>``)."""
        return {}

    def load_tensors(self, layer: SparseLinear, tensors: dict[str, torch.Tensor]) -> None:
        """Set what ``layer_tensors`` returned (from a recipe) and fold it."""


CORRECTIONS: Registry[type[Correction]] = Registry("mitigation")
"""The corrections by name, in the order they are spelled and shown."""


def per_layer_statistic(
    statistic: str,
    observe: Callable[..., dict[str, torch.Tensor]],
    model: nn.Module,
    layers: dict[str, nn.Linear],
    measurements: Measurements,
    purpose: str,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer: {statistic: tensor}}`` from ``observe(model, windows, layers, purpose, batch_size)``
    (``actsparse.calibration.measure``), measured once per ``measurements`` and shared by every variant."""
    values = measurements.get(
        (statistic, sorted(layers)),
        lambda windows: observe(model, windows, layers, purpose, measurements.batch_size),
    )
    return {name: {statistic: value} for name, value in values.items()}


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

    def check(self, config: SparsityConfig) -> None:
        if not 0 <= self.smooth_alpha <= 1:
            raise ActsparseError(f"smooth_alpha {self.smooth_alpha:g} is outside [0, 1]; use e.g. 0.5.")

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measurements: Measurements
    ) -> dict[str, dict[str, torch.Tensor]]:
        return per_layer_statistic(
            "input_max", input_abs_max, model, layers, measurements, f"{self.name} smoothing"
        )

    def transform_weight(
        self, layer: SparseLinear, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        scale = smoothing_scale(statistics["input_max"].to(weight.device), weight, self.smooth_alpha)
        scale = (1 / scale if self.inverse else scale).to(weight.dtype)
        layer.register_buffer("input_scale", scale, persistent=False)
        return weight.detach() * scale  # W · diag(s): columns scaled, X / s keeps X Wᵀ

    def every_call(self, layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        return x / layer.input_scale


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

    def check(self, config: SparsityConfig) -> None:
        if any(pattern.unstructured for pattern in config.layer_patterns):
            raise ActsparseError(
                "The permute correction chooses the groups of an N:M pattern and unstructured "
                "sparsity has none; choose an N:M pattern or drop permute."
            )

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measurements: Measurements
    ) -> dict[str, dict[str, torch.Tensor]]:
        return per_layer_statistic(
            "input_mean_square", input_mean_square, model, layers, measurements, "permute statistics"
        )

    def transform_weight(
        self, layer: SparseLinear, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if not layer.sparse:
            layer.register_buffer("input_order", None, persistent=False)
            return weight
        mean_square = statistics["input_mean_square"].to(weight.device)
        smoothing = getattr(layer, "input_scale", None)
        if smoothing is not None:  # smoothed first: selection sees X / s
            mean_square = mean_square / smoothing.float().square()
        weight_factor = layer.criterion.weight_factor
        if weight_factor is not None:
            mean_square = mean_square * weight_factor(weight).square()
        order = balanced_groups(mean_square, layer.pattern.m)
        layer.register_buffer("input_order", order, persistent=False)
        return weight.detach()[:, order]

    def every_call(self, layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
        return x if layer.input_order is None else x[..., layer.input_order]


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

    def check(self, config: SparsityConfig) -> None:
        if self.shift_statistic not in SHIFT_STATISTICS:
            raise ActsparseError(f"Unknown shift statistic '{self.shift_statistic}'; choose median or mean.")

    def attach(self, layer: SparseLinear) -> None:
        layer.row_sum = layer.weight.detach().sum(dim=1)

    def before_selection(self, layer: SparseLinear, call: SparseCall) -> None:
        call.eta = shift_value(call.input, self.shift_statistic)
        call.input = call.input - call.eta


@CORRECTIONS.register
@dataclass(frozen=True)
class RestoreVariance(Correction):
    """Rescale the kept values so each token keeps the variance of its dense input."""

    name: ClassVar[str] = "var"
    description: ClassVar[str] = "rescale the kept values to the token's dense variance"
    stage: ClassVar[int] = 30
    rescales_kept: ClassVar[bool] = True

    def kept_values(self, layer: SparseLinear, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
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
        row sums ``(1 + a) W.sum(1)`` for the per-token η, and the selection factor."""
        gain = 1 + self.output_scale
        base_bias = weight @ self.shift if bias is None else bias + weight @ self.shift
        return FoldedLayer(
            weight=(gain[:, None] * weight * self.scale).contiguous(),
            bias=gain * base_bias + self.output_bias,
            row_sum=gain * weight.sum(dim=1),
            channel_factor=self.selection_factor(channel_factor).contiguous(),
        )


LEARNABLE_PARTS = ("input", "input+output")
"""What learnable corrections may fit (``Learnable.learn``)."""


@CORRECTIONS.register
@dataclass(frozen=True)
class Learnable(Correction):
    """Per-channel input shift and scale (and, with ``learn="input+output"``, output scale and bias),
    calibrated (``actsparse.calibration.fitting``) and folded into the layer's weight, bias and selection factor."""

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

    def check(self, config: SparsityConfig) -> None:
        from actsparse.calibration.fitting import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ActsparseError(
                f"Unknown objective '{self.objective}'; choose one of {', '.join(OBJECTIVES)}."
            )
        if self.learn not in LEARNABLE_PARTS:
            raise ActsparseError(f"Unknown learn='{self.learn}'; choose one of {', '.join(LEARNABLE_PARTS)}.")
        if any(c.rescales_kept for c in config.mitigation):
            raise ActsparseError(
                "Mitigation var+learnable is not supported: the learned per-channel scale already "
                "restores the kept values' size; use learnable or shift+learnable."
            )
        if config.quant != "none":
            raise ActsparseError(
                "Learnable corrections are calibrated without quantisation and cannot be combined "
                "with quant='w8a8' yet; use a training-free mitigation with W8A8."
            )

    def attach(self, layer: SparseLinear) -> None:
        if layer.sparse:
            weight = layer.weight
            layer.correction = LearnedCorrection(
                layer.in_features, layer.out_features, self.learn, weight.dtype, weight.device
            )

    @staticmethod
    def _live(layer: SparseLinear) -> LearnedCorrection | None:
        """The layer's correction while it is not folded yet (calibration's differentiable form)."""
        correction = layer.correction
        return None if correction is None or correction.folded else correction

    def before_selection(self, layer: SparseLinear, call: SparseCall) -> None:
        correction = layer.correction
        if correction is None:
            return
        call.input = call.input - correction.shift
        if not correction.folded:  # folded, the factor already holds |scale|
            call.factor = correction.selection_factor(call.factor)

    def rescales_kept_values(self, layer: SparseLinear) -> bool:
        return self._live(layer) is not None

    def kept_values(self, layer: SparseLinear, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
        correction = self._live(layer)
        return kept if correction is None else kept * correction.scale + correction.shift

    def after_product(self, layer: SparseLinear, call: SparseCall, y: torch.Tensor) -> torch.Tensor:
        correction = self._live(layer)
        return y if correction is None else y * (1 + correction.output_scale) + correction.output_bias

    def calibrate(
        self, handle: SparsityHandle, windows: torch.Tensor | None, settings: CalibrationSettings
    ) -> dict[str, Any]:
        from actsparse.calibration.fitting import learn_corrections

        return learn_corrections(handle, windows, settings, self.objective, self.learn)

    def calibration_label(self, record: dict[str, Any]) -> list[str]:
        from actsparse.calibration.fitting import OBJECTIVES

        lr = record.get("settings", {}).get("lr")
        if lr is None or lr == OBJECTIVES[self.objective].lr_for(self.learn):
            return []
        return ["lr=" + ",".join(f"{rate:g}" for rate in (lr if isinstance(lr, list) else [lr]))]

    def fold(self, layer: SparseLinear) -> None:
        correction = layer.correction
        if correction is None:
            return
        folded = correction.fold(layer.weight, layer.bias, layer.channel_factor)
        correction.folded = True
        layer.set_sparse_operands(
            folded.weight,
            folded.bias,
            folded.row_sum if layer.row_sum is not None else None,
            folded.channel_factor,
        )

    def layer_tensors(self, layer: SparseLinear) -> dict[str, torch.Tensor]:
        correction = layer.correction
        if correction is None:
            return {}
        return {f"correction.{name}": p.detach() for name, p in correction.named_parameters()}

    def load_tensors(self, layer: SparseLinear, tensors: dict[str, torch.Tensor]) -> None:
        correction = layer.correction
        if correction is None:
            return
        for name, parameter in correction.named_parameters():
            parameter.copy_(tensors[f"correction.{name}"])
        self.fold(layer)


def parse_mitigation(text: str) -> tuple[type[Correction], ...]:
    """The correction classes of a spelled mitigation such as ``"shift+var"`` (``"none"``: none)."""
    if text == "none":
        return ()
    parts = text.split("+")
    if not all(parts) or any(part not in CORRECTIONS for part in parts):
        raise ActsparseError(
            f"Unknown mitigation '{shorten(text)}'; use none, one of {', '.join(CORRECTIONS)}, or several "
            "joined with + such as shift+var or smoothquant+shift+learnable."
        )
    return tuple(CORRECTIONS.get(part) for part in parts)
