"""``SparsityConfig``: everything that defines one activation-sparsity setting, as plain data."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from actsparse.criteria import get_criterion
from actsparse.errors import ActsparseError
from actsparse.kernels import MAX_GROUP
from actsparse.patterns import Pattern, parse_pattern

DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
"""The decoder's attention and MLP projections in Llama, Gemma, Qwen2, Mistral and their kin."""

PHASES = ("prefill", "all")
REMAINDERS = ("error", "dense")
POLICIES = ("all", "amber", "budget")
SMOOTHINGS = ("none", "smoothquant", "outstanding")
QUANTS = ("none", "w8a8")
DEFAULT_ALPHA = {"smoothquant": 0.5, "outstanding": 0.1}
CORRECTIONS = ("shift", "var", "learnable")
SHIFT_STATISTICS = ("median", "mean")
BACKENDS = ("emulated", "cpu-kernel")


@dataclass(frozen=True)
class SparsityConfig:
    """One activation-sparsity setting.

    Args:
        pattern: ``"N:M"`` (keep N of every M consecutive inputs) or ``"unstructured:<density>"``.
        criterion: score used to choose the kept inputs: magnitude, wina, amber, clact or variance.
        phase: ``"prefill"`` sparsifies only calls that process more than one token per sequence
            (prompt processing; decode stays dense), ``"all"`` every call.
        include: regular expressions; a linear layer is a target if its name matches any of them.
        exclude: regular expressions; a matching layer is never a target. The LM head never is.
        remainder: what to do when a layer's input width is not a multiple of M: ``"error"``
            refuses, ``"dense"`` keeps the last ``in % M`` inputs dense.
        policy: which target layers are sparsified: ``"all"``, ``"amber"`` (Amber Pruner's rule:
            down always, q and gate except in up to ``amber_skip`` most sensitive layers each while
            the sparse share stays at least ``flop_share``; never k, v, o, up) or ``"budget"`` (the
            least sensitive set reaching ``flop_share`` of linear FLOPs). Policies other than
            ``all`` measure sensitivities on calibration text.
        smooth: per-input-channel scaling before selection, from calibration maxima:
            ``"smoothquant"`` (``s = max|X|^α / max|W|^(1−α)``, X/s and W·s) or ``"outstanding"``
            (Outstanding-sparse: the inverse scale, which widens the activation range).
        smooth_alpha: α of the smoothing; None means 0.5 for smoothquant and 0.1 for outstanding.
        quant: ``"w8a8"`` adds int8 weights per output channel and int8 activations per token
            (simulated) to every target layer not matched by ``quant_exclude``.
        mitigation: corrections of the sparse input, joined with ``+``: ``"shift"`` selects on
            ``x − η`` (η the token's ``shift_statistic``, median or mean) and adds ``η · W.sum(1)``
            back to the output; ``"var"`` rescales the kept values so the token's variance is that
            of the dense input; ``"learnable"`` adds per-channel scale and shift of the input and
            scale and bias of the output, calibrated block by block (``actsparse.calibrate``) and
            folded into the weight and bias. (Static scaling is ``smooth="smoothquant"``, whose
            α = 0.5 scale is ``sqrt(max|X| / max|W|)``.)
        backend: how a sparsified call is computed: ``"emulated"`` zeroes the dropped inputs and
            multiplies densely (any dtype or device); ``"cpu-kernel"`` multiplies only the kept
            inputs with actsparse's compiled sparse GEMM (float32 on the CPU, N:M with M ≤ 64;
            other calls, and every call when the extension was not built, stay emulated).
    """

    pattern: str = "8:16"
    criterion: str = "amber"
    phase: Literal["prefill", "all"] = "prefill"
    include: tuple[str, ...] = (DEFAULT_TARGETS,)
    exclude: tuple[str, ...] = ()
    remainder: Literal["error", "dense"] = "error"
    policy: Literal["all", "amber", "budget"] = "all"
    flop_share: float = 0.55
    amber_skip: int = 5
    smooth: Literal["none", "smoothquant", "outstanding"] = "none"
    smooth_alpha: float | None = None
    quant: Literal["none", "w8a8"] = "none"
    quant_exclude: tuple[str, ...] = ()
    mitigation: str = "none"
    shift_statistic: Literal["median", "mean"] = "median"
    backend: Literal["emulated", "cpu-kernel"] = "emulated"
    parsed_pattern: Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed_pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "pattern", str(self.parsed_pattern))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "quant_exclude", tuple(self.quant_exclude))
        if self.smooth_alpha is None and self.smooth != "none":
            object.__setattr__(self, "smooth_alpha", DEFAULT_ALPHA.get(self.smooth))
        get_criterion(self.criterion)
        if self.phase not in PHASES:
            raise ActsparseError(f"Unknown phase '{self.phase}'; choose 'prefill' or 'all'.")
        if self.remainder not in REMAINDERS:
            raise ActsparseError(f"Unknown remainder policy '{self.remainder}'; choose 'error' or 'dense'.")
        for name, value, allowed in (
            ("policy", self.policy, POLICIES),
            ("smoothing", self.smooth, SMOOTHINGS),
            ("quantisation", self.quant, QUANTS),
        ):
            if value not in allowed:
                raise ActsparseError(f"Unknown {name} '{value}'; choose one of {', '.join(allowed)}.")
        if self.shift_statistic not in SHIFT_STATISTICS:
            raise ActsparseError(f"Unknown shift statistic '{self.shift_statistic}'; choose median or mean.")
        unknown = set(self.corrections) - set(CORRECTIONS)
        if unknown or (self.mitigation != "none" and not self.corrections):
            raise ActsparseError(
                f"Unknown mitigation '{self.mitigation}'; use none, shift, var, learnable or a "
                "combination such as shift+var or shift+learnable (static scaling is "
                "smooth='smoothquant', or --mitigation smooth on the command line)."
            )
        if self.learnable and "var" in self.corrections:
            raise ActsparseError(
                "Mitigation var+learnable is not supported: the learned per-channel scale already "
                "restores the kept values' size; use learnable or shift+learnable."
            )
        if self.learnable and self.quant != "none":
            raise ActsparseError(
                "Learnable corrections are calibrated without quantisation and cannot be combined "
                "with quant='w8a8' yet; use a training-free mitigation with W8A8."
            )
        self._check_backend()
        if not 0 < self.flop_share <= 1:
            raise ActsparseError(f"flop_share {self.flop_share:g} is outside (0, 1]; use e.g. 0.55.")
        if self.amber_skip < 0:
            raise ActsparseError(f"amber_skip {self.amber_skip} is negative; use 0 or more (5 is published).")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise ActsparseError(f"smooth_alpha {self.smooth_alpha:g} is outside [0, 1]; use e.g. 0.5.")
        for expression in (*self.include, *self.exclude, *self.quant_exclude):
            try:
                re.compile(expression)
            except re.error as error:
                raise ActsparseError(
                    f"Layer filter '{expression}' is not a valid regular expression ({error}); fix or quote it."
                ) from None

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ActsparseError(f"Unknown backend '{self.backend}'; choose emulated or cpu-kernel.")
        if self.backend == "emulated":
            return
        pattern = self.parsed_pattern
        refusal = None
        if pattern.unstructured:
            refusal = "runs N:M patterns only; choose an N:M pattern"
        elif not pattern.dense and pattern.m > MAX_GROUP:
            refusal = f"takes M up to {MAX_GROUP}; choose a smaller group"
        elif self.quant != "none":
            refusal = "computes in float32 and does not quantise; drop quant='w8a8'"
        elif "var" in self.corrections:
            refusal = "does not rescale the kept values; drop the var mitigation"
        if refusal:
            raise ActsparseError(f"The cpu-kernel backend {refusal}, or use backend='emulated'.")

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"8:16 amber"`` or ``"8:16 amber policy=amber w8a8"``."""
        parts = [self.pattern] if self.parsed_pattern.dense else [self.pattern, self.criterion]
        if self.policy != "all":
            parts.append(f"policy={self.policy}")
        if self.smooth != "none":
            parts.append(self.smooth)
        if self.corrections:
            parts.append(self.mitigation)
        if self.quant != "none":
            parts.append(self.quant)
        if self.backend != "emulated":
            parts.append(self.backend)
        return " ".join(parts)

    @property
    def corrections(self) -> tuple[str, ...]:
        """The corrections named in ``mitigation``, e.g. ``("shift", "var")`` or ``("learnable",)``."""
        return tuple(part for part in self.mitigation.split("+") if part and part != "none")

    @property
    def learnable(self) -> bool:
        """True when the mitigation includes calibrated (learned) corrections."""
        return "learnable" in self.corrections

    @property
    def needs_calibration(self) -> bool:
        """True when attaching measures or learns something on calibration text first."""
        return self.policy != "all" or self.smooth != "none" or self.learnable

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``SparsityConfig.from_dict`` reads it back."""
        data = asdict(self)
        data.pop("parsed_pattern")
        for name in ("include", "exclude", "quant_exclude"):
            data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        """Read back ``to_dict``."""
        return cls(**data)
