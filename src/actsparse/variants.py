"""Variants written as text: ``"pattern=8:16 criterion=amber policy=amber"`` or
``"weights=wanda pattern=2:4"`` — one per ``--variant`` option or per line of a ``--variants`` file.

Keys are the fields of ``SparsityConfig`` (activation sparsity) or, with ``weights=<method>``, of
``WeightPruningConfig``; ``include``, ``exclude`` and ``quant_exclude`` take one regular expression.
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path
from typing import Any

from actsparse.baselines import WeightPruningConfig
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.evaluate import Variant

_TUPLES = {"include", "exclude", "quant_exclude"}
_INTS = {"amber_skip", "blocksize"}
_FLOATS = {"flop_share", "smooth_alpha", "damping"}


def _value(key: str, text: str) -> Any:
    if key in _TUPLES:
        return (text,)
    try:
        if key in _INTS:
            return int(text)
        if key in _FLOATS:
            return float(text)
    except ValueError:
        raise ActsparseError(f"Setting {key}={text} needs a number.") from None
    return text


def parse_variant(spec: str, defaults: dict[str, Any] | None = None) -> Variant:
    """One variant from ``key=value`` words; ``defaults`` fill the keys the spec leaves out."""
    settings: dict[str, Any] = {}
    for word in spec.split():
        key, sep, text = word.partition("=")
        if not sep or not text:
            raise ActsparseError(f"'{word}' in variant '{spec}' is not key=value, e.g. pattern=8:16.")
        settings[key] = _value(key, text)
    kind = WeightPruningConfig if "weights" in settings else SparsityConfig
    if kind is WeightPruningConfig:
        settings["method"] = settings.pop("weights")
    known = {f.name for f in fields(kind) if f.init}
    if unknown := set(settings) - known:
        raise ActsparseError(
            f"Unknown setting(s) {', '.join(sorted(unknown))} in variant '{spec}'; known: {', '.join(sorted(known))}."
        )
    inherited = {k: v for k, v in (defaults or {}).items() if k in known and k not in settings}
    return kind(**inherited, **settings)


def read_variants(path: Path, defaults: dict[str, Any] | None = None) -> list[Variant]:
    """Variants from a text file: one per line; blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise ActsparseError(
            f"Variants file '{path}' does not exist; pass a text file with one variant per line."
        )
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [parse_variant(line, defaults) for line in lines if line]


def mitigation_settings(text: str) -> dict[str, str]:
    """Settings of one mitigation entry: ``smooth`` is static scaling (SmoothQuant, α 0.5), the
    other parts (shift, var, learnable) are corrections; e.g. ``shift+smooth``."""
    parts = [part for part in text.split("+") if part]
    settings = {"smooth": "smoothquant"} if "smooth" in parts else {}
    return settings | {"mitigation": "+".join(p for p in parts if p != "smooth") or "none"}


def cross_product(
    patterns: list[str],
    criteria: list[str],
    policies: list[str],
    mitigations: list[str],
    weights: list[str],
    shared: dict[str, Any],
) -> list[Variant]:
    """Every pattern × criterion × policy × mitigation, then each weight-pruning method at each pattern;
    ``shared`` holds the settings common to all (phase, include, exclude, ...)."""
    if not patterns or not criteria or not policies or not mitigations:
        raise ActsparseError(
            "Give at least one pattern and one criterion, e.g. --pattern 8:16 --criterion amber."
        )
    configs: list[Variant] = [
        SparsityConfig(pattern=p, criterion=c, policy=pol, **mitigation_settings(mit), **shared)
        for p, c, pol, mit in itertools.product(patterns, criteria, policies, mitigations)
    ]
    configs += [
        WeightPruningConfig(method=method, pattern=p, include=shared["include"], exclude=shared["exclude"])
        for method, p in itertools.product(weights, patterns)
    ]
    return configs
