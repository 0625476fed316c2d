"""``SparsityConfig``: everything that defines one activation-sparsity setting, as plain data, and
the one parser of its spelled-out form (command-line options, ``--variant`` strings, sweep files).

The config nests its pieces: ``policy`` is a ``Policy`` (``AmberRule(flop_share=0.55,
amber_skip=5)``) and ``corrections`` a tuple of ``Correction`` pieces (``(Shift("median"),
RestoreVariance())``); each validates its own settings. Spelled out, every setting is one flat
``key=value`` whose key is a field of the config or of one of its pieces (``policy=amber
flop_share=0.6 corrections=shift+var shift_statistic=mean``); ``configs_from_settings`` reads that
form, whatever it came from. ``CalibrationSettings`` says how learned corrections are fitted.

The config imports no piece: it looks names up in the registries of ``actsparse.pieces.base``,
which the pieces register into.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import InitVar, asdict, dataclass, field
from typing import Any

from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.patterns import Pattern, parse_pattern
from actsparse.core.registry import Piece, Registry, build_piece, own_settings, piece_from_dict, stored_piece
from actsparse.pieces.base import (
    BACKENDS,
    CORRECTIONS,
    CRITERIA,
    POLICIES,
    Correction,
    Policy,
    parse_corrections,
)

DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
"""The decoder's attention and MLP projections in Llama, Gemma, Qwen2, Mistral and their kin."""

OLD_NAMES = {"mitigation": "corrections"}
"""Settings by the names they had before, still accepted wherever a user or a file gives them:
``SparsityConfig(mitigation=...)``, ``--mitigation``, variant keys, sweep files, recipes and results."""


def current_names(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with old names (``OLD_NAMES``) replaced by the current ones; a setting given
    under both names is refused."""
    renamed = {OLD_NAMES.get(key, key): value for key, value in settings.items()}
    if len(renamed) < len(settings):
        raise _given_twice(next(old for old in OLD_NAMES if old in settings and OLD_NAMES[old] in settings))
    return renamed


def _given_twice(old: str) -> ActsparseError:
    new = OLD_NAMES[old]
    return ActsparseError(f"{old} is the old name of {new} and both are given; give {new} only.")


PHASES = ("prefill", "all")
REMAINDERS = ("error", "dense")
QUANTS = ("none", "w8a8")


def _about(help: str, repeatable: bool = False) -> dict[str, Any]:
    """A setting's field metadata: its help text and whether it is given once per value."""
    return {"help": help, "repeatable": repeatable}


@dataclass(frozen=True)
class SparsityConfig:
    """One activation-sparsity setting.

    Args:
        pattern: ``"N:M"`` (keep N of every M consecutive inputs), ``"unstructured:<density>"``
            or ``"dense"``.
        criterion: score used to choose the kept inputs (``actsparse.pieces.criteria.CRITERIA``).
        phase: ``"prefill"`` sparsifies only calls that process more than one token per sequence
            (prompt processing; decode stays dense), ``"all"`` every call.
        include: regular expressions; a linear layer is a target if its name matches any of them.
        exclude: regular expressions; a matching layer is never a target. The LM head never is.
        remainder: what to do when a layer's input width is not a multiple of M: ``"error"``
            refuses, ``"dense"`` keeps the last ``in % M`` inputs dense.
        policy: which target layers are sparsified: a ``Policy`` or its name
            (``actsparse.pieces.policies.POLICIES``: all, amber, budget, kl) with default settings.
        rest_pattern: the pattern of the target layers the policy leaves out: ``"dense"``, or a
            denser N:M (``"12:16"``) for a mixed pattern, the sparser ``pattern`` on the layers the
            policy chose and ``rest_pattern`` on the others.
        corrections: the corrections (``actsparse.pieces.corrections``), as pieces or spelled
            with ``+`` (``"shift+var"``, ``"smoothquant+shift+learnable"``); ``"none"`` for none.
        quant: ``"w8a8"`` adds int8 weights per output channel and int8 activations per token
            (simulated) to every target layer not matched by ``quant_exclude``.
        backend: how the products are computed (``actsparse.pieces.backends.BACKENDS``): ``"emulated"``
            or ``"cpu-kernel"``.
    """

    pattern: str = field(
        default="8:16", metadata=_about("N:M (keep N of every M inputs), unstructured:<density>, or dense.")
    )
    criterion: str = field(
        default="amber", metadata=_about("Score that chooses the kept inputs: {criteria}.")
    )
    phase: str = field(
        default="prefill", metadata=_about("prefill: sparsify prompt processing only; all: every call.")
    )
    include: tuple[str, ...] = field(
        default=(DEFAULT_TARGETS,),
        metadata=_about("Regex on layer names to sparsify (repeatable).", repeatable=True),
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata=_about("Regex on layer names to keep dense (repeatable).", repeatable=True)
    )
    remainder: str = field(
        default="error",
        metadata=_about("When in_features is not a multiple of M: error, or dense (tail dense)."),
    )
    policy: Policy = field(default="all", metadata=_about("Which target layers are sparsified: {policies}."))
    rest_pattern: str = field(
        default="dense",
        metadata=_about("Pattern of the target layers the policy leaves out: dense, or N:M (12:16) to mix patterns."),
    )
    corrections: tuple[Correction, ...] = field(
        default=(), metadata=_about("Corrections, joined with + (shift+var): none, {corrections}.")
    )
    quant: str = field(
        default="none", metadata=_about("none, or w8a8: int8 weights per channel and activations per token.")
    )
    quant_exclude: tuple[str, ...] = field(
        default=(),
        metadata=_about("Regex on layer names that W8A8 leaves unquantised (repeatable).", repeatable=True),
    )
    backend: str = field(default="emulated", metadata=_about("How products are computed: {backends}."))
    parsed_pattern: Pattern = field(init=False, repr=False, compare=False)
    parsed_rest_pattern: Pattern = field(init=False, repr=False, compare=False)
    mitigation: InitVar[tuple[Correction, ...] | str | None] = None
    """The old name of ``corrections`` (``OLD_NAMES``), still accepted."""

    def __post_init__(self, mitigation: tuple[Correction, ...] | str | None) -> None:
        set_ = object.__setattr__
        if mitigation is not None:
            if self.corrections:
                raise _given_twice("mitigation")
            set_(self, "corrections", mitigation)
        for name in ("criterion", "phase", "remainder", "quant", "backend"):
            if not isinstance(getattr(self, name), str):
                raise ActsparseError(
                    f"{name} must be a name (a string such as {getattr(SparsityConfig, name)!r}), "
                    f"not {shorten(repr(getattr(self, name)))}."
                )
        set_(self, "parsed_pattern", parse_pattern(self.pattern))
        set_(self, "pattern", str(self.parsed_pattern))
        set_(self, "parsed_rest_pattern", parse_pattern(self.rest_pattern))
        set_(self, "rest_pattern", str(self.parsed_rest_pattern))
        for name in ("include", "exclude", "quant_exclude"):
            set_(self, name, _expressions(name, getattr(self, name)))
        set_(self, "policy", _policy(self.policy))
        set_(self, "corrections", _corrections(self.corrections))
        CRITERIA.get(self.criterion)
        if self.phase not in PHASES:
            raise ActsparseError(f"Unknown phase '{self.phase}'; choose 'prefill' or 'all'.")
        if self.remainder not in REMAINDERS:
            raise ActsparseError(f"Unknown remainder policy '{self.remainder}'; choose 'error' or 'dense'.")
        if self.quant not in QUANTS:
            raise ActsparseError(f"Unknown quantisation '{self.quant}'; choose one of {', '.join(QUANTS)}.")
        self.policy.check()
        if not self.parsed_rest_pattern.dense and self.policy.name == "all":
            raise ActsparseError(
                f"rest_pattern {self.rest_pattern} applies to the target layers a layer policy leaves "
                "out, and policy=all leaves none; choose a policy (kl, budget, amber) or drop rest_pattern."
            )
        for correction in self.corrections:
            correction.check(self)
        if refusal := BACKENDS.get(self.backend).refusal(self):
            raise ActsparseError(f"The {self.backend} backend {refusal}, or use backend='emulated'.")
        for expression in (*self.include, *self.exclude, *self.quant_exclude):
            try:
                re.compile(expression)
            except re.error as error:
                raise ActsparseError(
                    f"Layer filter '{expression}' is not a valid regular expression ({error}); fix or quote it."
                ) from None

    @property
    def layer_patterns(self) -> tuple[Pattern, ...]:
        """The patterns the sparse layers take: ``pattern``, and ``rest_pattern`` unless dense."""
        if self.parsed_rest_pattern.dense:
            return (self.parsed_pattern,)
        return (self.parsed_pattern, self.parsed_rest_pattern)

    @property
    def corrections_name(self) -> str:
        """The corrections spelled out, e.g. ``"shift+var"`` (``"none"`` without any)."""
        return "+".join(c.name for c in self.corrections) or "none"

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"8:16 amber"`` or ``"8:16 amber policy=amber shift flop_share=0.6"``."""
        parts = [self.pattern] if self.parsed_pattern.dense else [self.pattern, self.criterion]
        if self.policy.name != "all":
            parts.append(f"policy={self.policy.name}")
        if not self.parsed_rest_pattern.dense:
            parts.append(f"rest={self.rest_pattern}")
        if self.corrections:
            parts.append(self.corrections_name)
        for piece in (self.policy, *self.corrections):
            parts += [f"{key}={value}" for key, value in piece.changed_settings().items()]
        if self.quant != "none":
            parts.append(self.quant)
        if self.phase != "prefill":
            parts.append(f"phase={self.phase}")
        if self.backend != "emulated":
            parts.append(self.backend)
        return " ".join(parts)

    @property
    def learned(self) -> bool:
        """True when a correction is learned on calibration text (``learnable``)."""
        return any(c.learned for c in self.corrections)

    @property
    def needs_calibration(self) -> bool:
        """True when attaching measures or learns something on calibration text first."""
        return self.policy.needs_calibration or any(c.needs_calibration for c in self.corrections)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``SparsityConfig.from_dict`` reads it back."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        data["policy"] = self.policy.to_dict()
        data["corrections"] = [c.to_dict() for c in self.corrections]
        for name in ("include", "exclude", "quant_exclude"):
            data[name] = list(data[name])
        if self.parsed_rest_pattern.dense:  # configs without it keep the form (and keys) they had
            del data["rest_pattern"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        """Read back ``to_dict`` (or the flat form of actsparse 0.1's recipes, format 1)."""
        if not isinstance(data.get("policy", {}), dict):
            return cls(**_from_flat(data))
        data = current_names(data)
        if "policy" in data:
            data["policy"] = piece_from_dict(POLICIES, data["policy"])
        if "corrections" in data:
            data["corrections"] = tuple(piece_from_dict(CORRECTIONS, c) for c in data["corrections"])
        return cls(**data)


def _expressions(name: str, value: Any) -> tuple[str, ...]:
    """A layer filter as a tuple of regular expressions: one string is one expression (not a
    sequence of characters); anything but strings is refused."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ActsparseError(
        f"{name} must be a regular expression or a list of them (e.g. {name}=['q_proj$']), "
        f"not {shorten(repr(value))}."
    )


def _policy(value: Policy | str) -> Policy:
    if isinstance(value, Policy):
        return value
    if not isinstance(value, str):
        raise ActsparseError(
            f"policy must be a Policy or one of {', '.join(POLICIES)}, not {shorten(repr(value))}."
        )
    return POLICIES.get(value)()


def _corrections(value: tuple[Correction | str, ...] | str) -> tuple[Correction, ...]:
    """The corrections of ``value`` (a spelled string, or pieces and names), in registration order."""
    if isinstance(value, str):
        value = tuple(cls() for cls in parse_corrections(value))
    if not isinstance(value, (tuple, list)) or not all(isinstance(c, (Correction, str)) for c in value):
        raise ActsparseError(
            "corrections must be spelled as text (shift+var), or be a tuple of Correction pieces and "
            f"names, not {shorten(repr(value))}."
        )
    pieces = [c if isinstance(c, Correction) else parse_corrections(c)[0]() for c in value]
    order = list(CORRECTIONS)
    pieces.sort(key=lambda c: order.index(c.name) if c.name in order else len(order))
    names = [c.name for c in pieces]
    if len(set(names)) < len(names):
        raise ActsparseError(f"Corrections {'+'.join(names)} name a correction twice; name each once.")
    for group in {c.exclusive for c in pieces if c.exclusive}:
        clashing = [c.name for c in pieces if c.exclusive == group]
        if len(clashing) > 1:
            raise ActsparseError(
                f"Corrections {'+'.join(names)} combine {' and '.join(clashing)}, two {group} "
                "corrections; choose one."
            )
    return tuple(pieces)


_FLAT_PIECE_SETTINGS = ("flop_share", "amber_skip", "smooth_alpha", "shift_statistic")


def _from_flat(data: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments from the flat config of format-1 recipes (policy, smooth, the corrections
    under their old name ``mitigation``, and their settings side by side)."""
    data = dict(data)
    settings = {key: data.pop(key) for key in _FLAT_PIECE_SETTINGS if key in data}
    smooth, corrections = data.pop("smooth", "none"), data.pop("mitigation", "none")
    spelled = "+".join(
        ([smooth] if smooth != "none" else []) + [p for p in corrections.split("+") if p != "none"]
    )

    def piece(cls: type[Piece]) -> Piece:
        return stored_piece(cls, {k: v for k, v in own_settings(cls, settings).items() if v is not None})

    data["policy"] = piece(POLICIES.get(data.get("policy", "all")))
    data["corrections"] = tuple(piece(cls) for cls in parse_corrections(spelled or "none"))
    return data


# ---- how learned corrections are fitted ----------------------------------------------------


@dataclass(frozen=True)
class CalibrationSettings:
    """How the learned corrections are fitted.

    Args:
        steps: optimiser steps (per block for the block objectives), one calibration window each
            (batch 1); None means the objective's passes over the fitted calibration windows (one
            for the block objectives, two for ``output-kl``).
        lr: peak learning rate of AdamW (betas 0.9, 0.95; no weight decay); None means the
            objective's (5e-3 for the block objectives, 1e-3 for ``output-kl``, 1e-4 for it with
            ``learn="input+output"``). Several rates (a tuple) search: each is fitted from the same
            start and the fit least on the held-out windows is kept, one fit's time per rate.
        warmup: share of the steps over which the learning rate rises linearly (then cosine decay).
        clip: maximum gradient norm.
        explode: a step loss this many times the loss before calibration (or 0.1% of the dense
            output's own size, if that is larger) stops the run.
        holdout: share of the calibration windows (the last ones, at least one) that the fit
            never steps on; the objective on them judges the fit. 0 (or a single window) judges
            the fit on the windows it is fitted to.
        checks: how often the held-out objective is measured: at the start and after every
            ``1/checks`` of the steps.

    Each block (or, for ``output-kl``, the model) keeps its corrections as they were at the check
    with the least held-out objective, at any of the rates — as they started (``BlockFit.kept_step``
    0) when no check beat the start — so calibration never makes it worse on text it did not fit.
    """

    steps: int | None = None
    lr: float | tuple[float, ...] | None = None
    warmup: float = 0.03
    clip: float = 1.0
    explode: float = 100.0
    holdout: float = 0.25
    checks: int = 4

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ActsparseError(
                f"Calibration steps {self.steps} must be at least 1 (or omitted for the objective's default)."
            )
        if isinstance(self.lr, tuple | list):
            if not self.lr:
                raise ActsparseError("No learning rate given; give one (e.g. 1e-3) or several (1e-3,1e-4).")
            rates = tuple(dict.fromkeys(float(rate) for rate in self.lr))
            object.__setattr__(self, "lr", rates if len(rates) > 1 else rates[0])
        for rate in self.rates:
            if not rate > 0:
                raise ActsparseError(f"Learning rate {rate:g} must be positive; use e.g. 1e-3.")
        if not 0 <= self.warmup < 1:
            raise ActsparseError(f"Warm-up share {self.warmup:g} is outside [0, 1); use e.g. 0.03.")
        if not 0 <= self.holdout < 1:
            raise ActsparseError(f"Held-out share {self.holdout:g} is outside [0, 1); use e.g. 0.25.")
        if self.checks < 1:
            raise ActsparseError(f"Held-out checks {self.checks} must be at least 1; use e.g. 4.")

    @property
    def rates(self) -> tuple[float, ...]:
        """The learning rates fitted: one, several (a search), or none while the objective's
        default is still open."""
        if self.lr is None:
            return ()
        return self.lr if isinstance(self.lr, tuple) else (self.lr,)

    def split(self, windows: int) -> tuple[range, range]:
        """The indices of the windows fitted on and of the held-out windows that judge the fit."""
        held = min(max(1, round(self.holdout * windows)), windows - 1) if self.holdout else 0
        if held == 0:
            return range(windows), range(windows)
        return range(windows - held), range(windows - held, windows)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON keeps them (several rates as a list)."""
        return asdict(self) | {"lr": list(self.lr) if isinstance(self.lr, tuple) else self.lr}


# ---- the spelled-out form --------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One flat setting: a field of ``SparsityConfig`` or of one or more pieces (``owners``)."""

    name: str
    help: str
    default: Any
    parse: Callable[[str], Any]
    repeatable: bool = False
    owners: tuple[str, ...] = ()
    old_names: tuple[str, ...] = ()


def _registry_names(registry: Registry) -> str:
    return ", ".join(registry)


def config_settings() -> list[Setting]:
    """Every setting of a config, top-level ones first, then the pieces' own (from the registries
    as they are now, so a registered piece brings its settings along)."""
    names = {
        "criteria": _registry_names(CRITERIA),
        "policies": _registry_names(POLICIES),
        "corrections": _registry_names(CORRECTIONS),
        "backends": _registry_names(BACKENDS),
    }
    settings = []
    for f in dataclasses.fields(SparsityConfig):
        if not f.init:
            continue
        default = f.default
        if f.name == "corrections":
            default = "none"
        old = tuple(key for key, name in OLD_NAMES.items() if name == f.name)
        help = f.metadata["help"].format(**names)
        settings.append(Setting(f.name, help, default, str, f.metadata["repeatable"], old_names=old))
    pieces: dict[str, Setting] = {}
    for kind, registry in (("policy", POLICIES), ("correction", CORRECTIONS)):
        for cls in registry.values():
            for f in cls.settings():
                owner = f"the {cls.name} {kind}"
                if f.name in pieces:
                    known = pieces[f.name]
                    defaults = known.default if known.default == f.default else "per piece"
                    pieces[f.name] = dataclasses.replace(
                        known, default=defaults, owners=(*known.owners, owner)
                    )
                else:
                    parse = f.metadata.get("parse", type(f.default))
                    pieces[f.name] = Setting(
                        f.name, f.metadata.get("help", ""), f.default, parse, owners=(owner,)
                    )
    return settings + list(pieces.values())


def _parsed(setting: Setting, text: Any) -> Any:
    if not isinstance(text, str):
        text = str(text)
    try:
        return setting.parse(text)
    except ValueError:
        kind = "a number" if setting.parse in (int, float) else f"a {setting.parse.__name__}"
        raise ActsparseError(f"Setting {setting.name}={text} needs {kind}.") from None


def _alternatives(setting: Setting, value: Any) -> list[Any]:
    """The values a setting takes across the cross product: a list, or a comma-separated string;
    a repeatable setting (regular expressions) is one value, its list whole."""
    if setting.repeatable:
        return [tuple([value] if isinstance(value, str) else value)]
    values = value if isinstance(value, (list, tuple)) else str(value).split(",")
    values = [v.strip() if isinstance(v, str) else v for v in values]
    values = [v for v in values if v != ""]
    if not values:
        raise ActsparseError(
            f"Setting {setting.name} is empty; give it at least one value, e.g. {setting.name}={setting.default}."
        )
    return [_parsed(setting, v) for v in values]


MAX_CONFIGURATIONS = 1024
"""The most configurations one command plans (a cross product of settings, the lines of a variants
file): each costs at least a pass over the evaluation windows, so more is a mistake in what was
asked (a list spelled out too many times, say) rather than a plan; split a larger study into runs."""


def check_plan_size(count: int) -> None:
    """Refuse a plan of more than ``MAX_CONFIGURATIONS`` configurations, before any is built."""
    if count > MAX_CONFIGURATIONS:
        raise ActsparseError(
            f"These settings plan {count:,} configurations, more than the {MAX_CONFIGURATIONS:,} one run "
            "takes; give fewer values per setting, or split the study into several runs."
        )


def configs_from_settings(
    values: Mapping[str, Any], inherited: Mapping[str, Any] | None = None
) -> list[SparsityConfig]:
    """Every config of the cross product of ``values`` (setting name → value, list of values, or
    comma-separated values); ``inherited`` settings fill the ones ``values`` leaves out, and a
    setting in neither takes its default.

    Piece settings (``flop_share``, ``shift_statistic``, ...) go to the chosen pieces that have
    them; one in ``values`` that no chosen piece has is refused (an inherited one is ignored), as is
    an unknown setting.
    """
    settings = {s.name: s for s in config_settings()}
    values, inherited = current_names(values), current_names(inherited or {})
    given = {**inherited, **values}
    if unknown := set(given) - set(settings):
        raise ActsparseError(
            f"Unknown setting(s) {shorten(', '.join(sorted(unknown)))}; known: {', '.join(settings)}."
        )
    top = {f.name for f in dataclasses.fields(SparsityConfig) if f.init}
    keys = list(given)
    alternatives = [_alternatives(settings[k], given[k]) for k in keys]
    check_plan_size(math.prod(len(values) for values in alternatives))
    used: set[str] = set()
    configs = []
    for combination in itertools.product(*alternatives):
        chosen = dict(zip(keys, combination))
        pieces = {k: v for k, v in chosen.items() if k not in top}

        def build(cls: type[Piece], pieces: dict[str, Any] = pieces) -> Piece:
            own = own_settings(cls, pieces)
            used.update(own)
            return build_piece(cls, own)

        arguments = {k: v for k, v in chosen.items() if k in top}
        arguments["policy"] = build(POLICIES.get(arguments.get("policy", "all")))
        spelled = arguments.get("corrections", "none")
        arguments["corrections"] = tuple(build(cls) for cls in parse_corrections(spelled))
        configs.append(SparsityConfig(**arguments))
    if unused := [k for k in values if k not in top and k not in used]:
        name = unused[0]
        raise ActsparseError(
            f"{name} is a setting of {' and '.join(settings[name].owners)}, which no configuration here "
            f"uses; drop {name} or choose one of those."
        )
    return list(dict.fromkeys(configs))
