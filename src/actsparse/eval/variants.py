"""Variants: what an evaluation compares with the dense model, and how each is prepared once.

A variant is activation sparsity (a ``SparsityConfig``, or a calibrated ``Recipe``) or weight
pruning (a ``WeightPruningConfig``). ``prepare_variants`` attaches each one once — measuring,
calibrating and folding what it needs, with every measurement shared between the variants that
ask for the same — and returns the detached handles that perplexity, tasks and generation then use.

Written as text, a variant is ``key=value`` words (``"pattern=8:16 criterion=amber policy=amber"``,
or ``"weights=wanda pattern=2:4"``), read by the config's one parser; a comma-separated value
gives one variant per value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibration.measure import Measurements
from actsparse.config import CalibrationSettings, SparsityConfig, check_plan_size, configs_from_settings
from actsparse.core.errors import ActsparseError, shorten
from actsparse.eval.baselines import WeightPruningConfig, WeightPruningHandle, prune_weights
from actsparse.io.recipe import Recipe
from actsparse.pipeline.phases import sparsify
from actsparse.sparse.handle import SparsityHandle

Variant = SparsityConfig | WeightPruningConfig | Recipe
"""What ``evaluate`` compares with the dense model."""

Prepared = SparsityHandle | WeightPruningHandle
"""A variant attached once and detached again, ready to be attached for each measurement."""

_WEIGHT_NUMBERS = {"blocksize": int, "damping": float}


Attach = Callable[[nn.Module, Any, Measurements, CalibrationSettings | None], Prepared]
"""How a kind of variant is attached: ``attach(model, variant, measurements, calibration_settings)``."""


@dataclass(frozen=True)
class VariantKind:
    """What can be a variant: how it is attached (its handle, attached), the seconds spent making it
    before this run (a recipe's calibration), and what makes two of them the same variant."""

    attach: Attach
    made_in: Callable[[Any], float] = lambda variant: 0.0
    identity: Callable[[Any], Any] = lambda variant: variant


VARIANT_KINDS: dict[type, VariantKind] = {
    SparsityConfig: VariantKind(
        lambda model, config, measurements, settings: sparsify(
            model, config, calibration_settings=settings, measurements=measurements
        )
    ),
    WeightPruningConfig: VariantKind(
        lambda model, config, measurements, settings: prune_weights(
            model, config, measurements.windows, measurements.batch_size
        )
    ),
    Recipe: VariantKind(
        lambda model, recipe, measurements, settings: sparsify(model, recipe=recipe),
        made_in=lambda recipe: (recipe.calibration or {}).get("seconds", 0.0),
        identity=id,  # recipes count as the same when they are the same object
    ),
}
"""The kinds of variant by type, as torchao keys its handlers by config type; a new kind is one
entry here."""


def variant_kind(variant: Any) -> VariantKind:
    """The kind of ``variant``; anything else is refused with one sentence."""
    kind = VARIANT_KINDS.get(type(variant))
    if kind is None:
        names = ", ".join(cls.__name__ for cls in VARIANT_KINDS)
        raise ActsparseError(f"A variant is one of {names}, not {shorten(repr(variant))}.")
    return kind


def attach_variant(
    model: nn.Module,
    variant: Variant,
    measurements: Measurements | None = None,
    calibration_settings: CalibrationSettings | None = None,
) -> Prepared:
    """Attach one variant to ``model`` and return its handle (attached)."""
    return variant_kind(variant).attach(
        model, variant, measurements or Measurements(None), calibration_settings
    )


def prepare_variants(
    model: nn.Module,
    variants: list[Variant | Prepared],
    calibration: torch.Tensor | None = None,
    calibration_settings: CalibrationSettings | None = None,
    progress: bool = True,
    batch_size: int = 1,
) -> list[Prepared]:
    """Every variant attached once (prepared handles pass through), then detached; ``calibration``
    windows (never the evaluation text) serve all of them, each statistic measured once, over
    ``batch_size`` windows per forward pass. Each handle's ``prepare_seconds`` is the time its
    preparation took: its calibration, and the measurements it was the first to need (those read
    back from the cache, such as the kl policy's, cost nothing); for a recipe, the time its
    calibration took when it was made."""
    measurements = Measurements(calibration, batch_size)
    prepared = []
    pending = sum(not isinstance(v, (SparsityHandle, WeightPruningHandle)) for v in variants)
    for variant in tqdm(
        variants, desc="preparing", unit="variant", disable=not (progress and pending), leave=False
    ):
        if isinstance(variant, (SparsityHandle, WeightPruningHandle)):
            prepared.append(variant)
            continue
        start = time.perf_counter()
        handle = attach_variant(model, variant, measurements, calibration_settings)
        handle.remove()
        handle.record_preparation(time.perf_counter() - start + variant_kind(variant).made_in(variant))
        prepared.append(handle)
    return prepared


def parse_variant(spec: str, inherited: Mapping[str, Any] | None = None) -> list[Variant]:
    """The variants of one ``key=value`` spec; ``inherited`` settings fill the keys it leaves out
    (those that a variant's pieces do not have are ignored)."""
    settings: dict[str, str] = {}
    for word in spec.split():
        key, sep, text = word.partition("=")
        if not sep or not text:
            raise ActsparseError(
                f"'{shorten(word)}' in variant '{shorten(spec)}' is not key=value, e.g. pattern=8:16."
            )
        if key in settings:
            raise ActsparseError(
                f"Variant '{shorten(spec)}' sets {shorten(key)} twice; give each setting once (several "
                f"values are comma-separated: {shorten(key)}={settings[key]},{shorten(text)})."
            )
        settings[key] = text
    if "weights" not in settings:
        return list(configs_from_settings(settings, inherited or {}))
    settings["method"] = settings.pop("weights")
    known = {f.name for f in fields(WeightPruningConfig)}
    if unknown := set(settings) - known:
        raise ActsparseError(
            f"Unknown setting(s) {shorten(', '.join(sorted(unknown)))} in variant '{shorten(spec)}'; "
            f"known: {', '.join(sorted(known))}."
        )
    arguments: dict[str, Any] = {k: v for k, v in (inherited or {}).items() if k in ("include", "exclude")}
    for key, text in settings.items():
        if key in ("include", "exclude"):
            arguments[key] = (text,)
        elif key in _WEIGHT_NUMBERS:
            try:
                arguments[key] = _WEIGHT_NUMBERS[key](text)
            except ValueError:
                raise ActsparseError(f"Setting {key}={text} needs a number.") from None
        else:
            arguments[key] = text
    return [WeightPruningConfig(**arguments)]


def read_variants(path: Path, inherited: Mapping[str, Any] | None = None) -> list[Variant]:
    """Variants from a text file: one spec per line; blank lines and ``#`` comments are skipped
    (a UTF-8 byte-order mark too). A file with no variant, or of more than ``MAX_CONFIGURATIONS``,
    is refused."""
    if not path.is_file():
        raise ActsparseError(
            f"Variants file '{path}' does not exist; pass a text file with one variant per line."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ActsparseError(f"Variants file '{path}' is not UTF-8 text; pass a text file.") from None
    variants: list[Variant] = []
    for line in (line.split("#", 1)[0].strip() for line in text.splitlines()):
        if line:
            variants += parse_variant(line, inherited)
            check_plan_size(len(variants))
    if not variants:
        raise ActsparseError(
            f"Variants file '{path}' holds no variant (only blank lines and comments); write one per line, "
            "e.g. pattern=8:16 criterion=amber."
        )
    return variants


def unique_variants(variants: list[Variant]) -> list[Variant]:
    """``variants`` without repeats, in their order: a variant given twice is prepared and evaluated
    once (``VariantKind.identity``: recipes count as the same when they are the same object)."""
    seen: set[Any] = set()
    unique = []
    for variant in variants:
        key = variant_kind(variant).identity(variant)
        if key not in seen:
            seen.add(key)
            unique.append(variant)
    return unique


def weight_variants(methods: list[str], patterns: list[str], inherited: Mapping[str, Any]) -> list[Variant]:
    """Weight pruning by each method at each N:M pattern, on the layers ``inherited`` selects."""
    filters = {k: tuple(v) for k, v in inherited.items() if k in ("include", "exclude")}
    return [WeightPruningConfig(method=m, pattern=p, **filters) for m in methods for p in patterns]
