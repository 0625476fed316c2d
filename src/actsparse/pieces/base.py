"""The interfaces of the pieces and their registries: what a criterion, a correction, a layer
policy and a backend are, what they may ask of the layer they serve (``SparseLayer``), of the
measurements (``Measuring``) and of the fitting (``Fitter``), and where each kind is registered.

The config and the sparse layer know the pieces only through this module; the pieces themselves
live in ``criteria``, ``corrections``, ``policies`` and ``backends``, each registering into the
registry here, so a piece added anywhere (a plugin, a test) is found by name like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from actsparse import kernels
from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.patterns import Pattern
from actsparse.core.registry import Piece, Registry

_TINY = 1e-12


# ---- what a piece sees of a call and of its layer ----------------------------------------------


@dataclass
class SparseCall:
    """One sparsified call on its way through the corrections and the backend: the input that
    selection sees, the criterion's per-channel factor, and the per-token shift η (added back to
    the output as ``η · row_sum``)."""

    input: torch.Tensor
    factor: torch.Tensor | None
    eta: torch.Tensor | None = None


@dataclass(frozen=True)
class Operands:
    """What a sparsified call multiplies with: weight, bias, the row sums for η, the factor."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    row_sum: torch.Tensor | None
    factor: torch.Tensor | None


class SparseLayer(Protocol):
    """What a piece may read and call on the layer it serves (``actsparse.sparse.layer.SparseLinear``).
    A piece keeps what it derives for a layer in its own state object, ``layer.state(piece)``."""

    name: str
    in_features: int
    out_features: int
    sparse: bool
    pattern: Pattern
    criterion: Criterion
    corrections: list[Correction]
    weight: torch.Tensor
    bias: torch.Tensor | None
    channel_factor: torch.Tensor | None
    row_sum: torch.Tensor | None
    offloaded: bool

    def state(self, piece: Correction | Backend) -> Any: ...
    def operands(self) -> Operands: ...
    def quantized(self, x: torch.Tensor) -> torch.Tensor: ...
    def sparsify_input(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor: ...
    def count_kept(self, kept: int, seen: int) -> None: ...
    def nan_error(self) -> ActsparseError: ...
    def add_row_sums(self) -> None: ...
    def set_sparse_operands(
        self, weight: torch.Tensor, bias: torch.Tensor | None, row_sum: torch.Tensor | None,
        factor: torch.Tensor | None,
    ) -> None: ...  # fmt: skip
    def use_weight_view(self, view: torch.Tensor) -> None: ...
    def restore_weight_layout(self) -> None: ...


class SparsitySettings(Protocol):
    """What a piece's ``check`` or ``refusal`` reads of the config it is part of
    (``actsparse.config.SparsityConfig``)."""

    parsed_pattern: Pattern
    layer_patterns: tuple[Pattern, ...]
    corrections: tuple[Correction, ...]
    quant: str


class Measuring(Protocol):
    """What a correction's ``measure`` asks of the measurements on calibration text
    (``actsparse.calibration.measure.Measurements``)."""

    def statistic(
        self, name: str, model: nn.Module, layers: dict[str, nn.Linear], purpose: str
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {name: tensor}}`` of the dense model's inputs to ``layers`` (``input_max``,
        ``input_mean_square``), measured once and shared by every variant that asks."""
        ...


class Fitter(Protocol):
    """What a learned correction's ``fit`` asks of the fitting (``actsparse.calibration.fitting``)."""

    def fit(self, parameters: dict[str, list[nn.Parameter]], objective: str, learn: str) -> dict[str, Any]:
        """Fit ``parameters`` (by layer name) of the attached model by ``objective`` (the parts
        ``learn`` names, at the rate it defaults to) on the calibration windows; the record."""
        ...


# ---- criteria ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """A named score. ``weight_factor`` maps a layer's weight ``(out, in)`` to a per-input-channel
    factor (or None); ``uses_batch`` marks scores that also depend on the other tokens of the call."""

    name: str
    description: str
    weight_factor: Callable[[torch.Tensor], torch.Tensor] | None = None
    uses_batch: bool = False

    def channel_factor(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor | None:
        """Per-input-channel multiplier of ``|x|`` for this call: the layer's static factor, times
        for CLACT the column norm of ``x`` over the call's tokens."""
        if self.uses_batch:
            norms = x.reshape(-1, x.shape[-1]).float().norm(dim=0).to(x.dtype)
            return norms if weight_factor is None else norms * weight_factor
        return weight_factor

    def score(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor:
        """Score every element of ``x`` (``(..., in)``); higher is kept first.

        CLACT's division by the token's row norm is applied here as published; it scales a whole
        row, so it never changes which entries of a row are kept.
        """
        factor = self.channel_factor(x, weight_factor)
        score = x.abs() if factor is None else x.abs() * factor
        if self.uses_batch:
            score = score / x.float().norm(dim=-1, keepdim=True).clamp_min(_TINY).to(x.dtype)
        return score


CRITERIA: Registry[Criterion] = Registry("criterion")
"""The selection criteria by name; add one with ``CRITERIA.register(Criterion(...))``."""


# ---- corrections -------------------------------------------------------------------------------


class CallHooks:
    """The per-call hooks of a correction, run by the layer and the backend on every call; each
    does nothing unless a subclass says otherwise::

        every call:       x = c.every_call(layer, x)                  smoothing, channel order
        sparsified call:  call = c.before_selection(layer, call)      shifts, the token's η
                          kept = select(call.input)                   (backend)
                          kept = c.kept_values(layer, call, kept)     restored variance, scales
                          y = kept Wᵀ + b + η · W.sum(1)              (backend)
                          y = c.after_product(layer, call, y)         output scale and bias
    """

    rescales_kept: ClassVar[bool] = False
    """Changes the kept values after selection (``kept_values``), which fused kernels can't do."""

    def every_call(self, layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
        return x

    def before_selection(self, layer: SparseLayer, call: SparseCall) -> SparseCall:
        """The call with its ``input``, ``factor`` or ``eta`` changed before the kept inputs are
        chosen (``dataclasses.replace(call, ...)``), or ``call`` itself."""
        return call

    def kept_values(self, layer: SparseLayer, call: SparseCall, kept: torch.Tensor) -> torch.Tensor:
        return kept

    def rescales_kept_values(self, layer: SparseLayer) -> bool:
        """True when ``kept_values`` changes anything for this layer now."""
        return self.rescales_kept

    def after_product(self, layer: SparseLayer, call: SparseCall, y: torch.Tensor) -> torch.Tensor:
        return y


@dataclass(frozen=True)
class Derived:
    """What a correction derives for one layer when it is built: the weight as the correction needs
    it, the correction's own state for the layer (an ``nn.Module``, so it moves with the model; None
    for none), and the calibration statistics as later corrections see the input (None: as given)."""

    weight: torch.Tensor
    state: nn.Module | None = None
    statistics: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Correction(CallHooks, Piece):
    """One correction: its per-call hooks (``CallHooks``) and its lifecycle, in the order a
    sparsification runs it — ``check`` the config, ``measure`` the dense model on calibration text,
    ``derive`` each layer's weight and state, ``attach`` to the finished layer, ``fit`` what it
    learns, ``fold`` that into the layer, and ``save_tensors`` / ``load_tensors`` for recipes.

    Class attributes: ``stage`` (order of application), ``needs_calibration`` (measures or learns on
    calibration text), ``learned`` (fitted, so sensitivities are measured without it),
    ``exclusive`` (at most one correction of this group per config), ``statistics`` (names of the
    per-layer tensors ``measure`` returns, one value per input channel, saved in recipes).
    """

    stage: ClassVar[int] = 50
    needs_calibration: ClassVar[bool] = False
    learned: ClassVar[bool] = False
    exclusive: ClassVar[str | None] = None
    statistics: ClassVar[tuple[str, ...]] = ()

    def check(self, config: SparsitySettings) -> None:
        """Refuse, with one sentence, a config this correction cannot be combined with."""

    def measure(
        self, model: nn.Module, layers: dict[str, nn.Linear], measuring: Measuring
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer statistics from the dense model on calibration text (named in ``statistics``)."""
        return {}

    def derive(
        self, layer: SparseLayer, weight: torch.Tensor, statistics: dict[str, torch.Tensor]
    ) -> Derived:
        """The layer's weight as this correction needs it (before quantisation) and its state."""
        return Derived(weight)

    def attach(self, layer: SparseLayer) -> None:
        """The layer is built (its weight is final); ask it for what this correction needs of it."""

    def fit(self, layers: dict[str, SparseLayer], fitter: Fitter) -> dict[str, Any] | None:
        """Fit what this correction learns in ``layers`` (attached); returns a JSON-ready record."""
        return None

    def calibration_label(self, record: dict[str, Any]) -> list[str]:
        """Words for table labels from a calibration ``record`` (what ``fit`` returned, or a
        recipe kept): how it was fitted where that differs from the defaults."""
        return []

    def fold(self, layer: SparseLayer) -> None:
        """Turn what was learned into the layer's sparse-call operands (inference form)."""

    def save_tensors(self, layer: SparseLayer) -> dict[str, torch.Tensor]:
        """Tensors this correction holds in ``layer`` (saved in recipes as ``<layer>.<name>``)."""
        return {}

    def load_tensors(self, layer: SparseLayer, tensors: dict[str, torch.Tensor]) -> None:
        """Set what ``save_tensors`` returned (from a recipe) and fold it."""


CORRECTIONS: Registry[type[Correction]] = Registry("correction")
"""The corrections by name, in the order they are spelled and shown."""


def parse_corrections(text: str) -> tuple[type[Correction], ...]:
    """The correction classes of spelled corrections such as ``"shift+var"`` (``"none"``: none)."""
    if text == "none":
        return ()
    parts = text.split("+")
    if not all(parts) or any(part not in CORRECTIONS for part in parts):
        raise ActsparseError(
            f"Unknown corrections '{shorten(text)}'; use none, one of {', '.join(CORRECTIONS)}, or several "
            "joined with + such as shift+var or smoothquant+shift+learnable."
        )
    return tuple(CORRECTIONS.get(part) for part in parts)


# ---- layer policies ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerChoice:
    """What a policy chooses from: the candidate layers' FLOPs per token, the model's total linear
    FLOPs per token (LM head excluded), ``sensitivity()``, each candidate's relative output error
    when sparsified alone, and ``output_kl(windows)``, the KL of the model's output from the dense
    one when each candidate alone is sparse, on the first ``windows`` calibration windows (each
    measured on calibration text the first time it is asked for)."""

    flops: dict[str, int]
    total_flops: int
    sensitivity: Callable[[], dict[str, float]]
    output_kl: Callable[[int], dict[str, float]]


@dataclass(frozen=True)
class Policy(Piece):
    """Which of the target layers are sparsified; ``needs_calibration`` when it measures first."""

    needs_calibration: ClassVar[bool] = False
    cost_name: ClassVar[str] = "‖Y − Y'‖ / ‖Y‖"

    def choose(self, choice: LayerChoice) -> list[str]:
        raise NotImplementedError

    def costs(self, choice: LayerChoice) -> dict[str, float]:
        """What the policy ranks the candidates by (``cost_name``), each sparsified alone."""
        return choice.sensitivity()

    def check(self) -> None:
        """Refuse settings out of range, with one sentence."""


POLICIES: Registry[type[Policy]] = Registry("policy")
"""The layer policies by name."""


# ---- backends ----------------------------------------------------------------------------------


class Backend:
    """How a layer computes its products; this base is the emulated product: dropped inputs are
    zeroed and the product is dense (any dtype, any device). Subclasses replace what they compute
    differently and fall back to this otherwise.

    A backend says what it refuses for a config (``refusal``), prepares a layer's state once
    (``prepare``, again after learned corrections are folded), lets the layer compute from what it
    prepared while the layer is in the model (``attach``; ``detach`` gives the weights their own
    layout back when it leaves), runs the dense product of calls that stay dense and the sparse
    product of sparsified calls, and describes in one sentence how a set of layers runs."""

    name: ClassVar[str]
    description: ClassVar[str]

    def refusal(self, config: SparsitySettings) -> str | None:
        """Why this backend cannot run ``config`` (a clause completing "The <name> backend ..."),
        or None."""
        return None

    def dtype_refusal(self, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this backend cannot compute a model in ``dtype`` on ``device`` (a sentence naming
        the fix), or None; asked before a model loads and again when a layer is prepared."""
        return None

    def prepare(self, layer: SparseLayer) -> nn.Module | None:
        """This backend's state for ``layer`` (e.g. packed weights), held as ``layer.state(backend)``."""
        return None

    def attach(self, layer: SparseLayer) -> None:
        """``layer`` goes into the model (after ``prepare``, and at every ``handle.attach()``)."""

    def detach(self, layer: SparseLayer) -> None:
        """``layer`` leaves the model (``handle.remove()``): the original module gets its weight
        back exactly as it was."""

    def dense(self, layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
        """A call that stays dense: the layer's own (smoothed, quantised) weight and bias."""
        return F.linear(layer.quantized(x), layer.weight, layer.bias)

    def sparse(self, layer: SparseLayer, call: SparseCall) -> torch.Tensor:
        """A sparsified call: select, let the corrections change the kept values, multiply, add
        ``η · row_sum`` for the shift."""
        kept = layer.sparsify_input(call.input, call.factor)
        for correction in layer.corrections:
            kept = correction.kept_values(layer, call, kept)
        operands = layer.operands()
        y = F.linear(layer.quantized(kept), operands.weight, operands.bias)
        return y if call.eta is None else y + call.eta * operands.row_sum

    def execution(self, layers: list[SparseLayer]) -> str:
        """How ``layers`` are computed, in one sentence."""
        selection = (
            f"selection compiled for float32 N:M on the CPU, {kernels.select_isa()}"
            if kernels.AVAILABLE
            else "selection in PyTorch: the compiled extension was not built"
        )
        return f"{self.name}: dropped inputs are zeroed and multiplied densely ({selection})."


BACKENDS: Registry[Backend] = Registry("backend")
"""The backends by name."""
