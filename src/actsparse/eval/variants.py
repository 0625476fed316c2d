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
from collections.abc import Mapping
from dataclasses import fields
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


def attach_variant(
    model: nn.Module,
    variant: Variant,
    measurements: Measurements | None = None,
    calibration_settings: CalibrationSettings | None = None,
) -> Prepared:
    """Attach one variant to ``model`` and return its handle (attached)."""
    measurements = measurements or Measurements(None)
    if isinstance(variant, WeightPruningConfig):
        return prune_weights(model, variant, measurements.windows, measurements.batch_size)
    if isinstance(variant, Recipe):
        return sparsify(model, recipe=variant)
    return sparsify(model, variant, calibration_settings=calibration_settings, measurements=measurements)


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
        seconds = time.perf_counter() - start
        if isinstance(variant, Recipe):  # and the time its calibration took, as the recipe says
            seconds += (variant.calibration or {}).get("seconds", 0.0)
        handle.record_preparation(seconds)
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
    once (recipes count as the same when they are the same object)."""
    seen: set[Any] = set()
    unique = []
    for variant in variants:
        key = id(variant) if isinstance(variant, Recipe) else variant
        if key not in seen:
            seen.add(key)
            unique.append(variant)
    return unique


def weight_variants(methods: list[str], patterns: list[str], inherited: Mapping[str, Any]) -> list[Variant]:
    """Weight pruning by each method at each N:M pattern, on the layers ``inherited`` selects."""
    filters = {k: tuple(v) for k, v in inherited.items() if k in ("include", "exclude")}
    return [WeightPruningConfig(method=m, pattern=p, **filters) for m in methods for p in patterns]
