"""Attach and detach N:M activation sparsity on a model: ``sparsify(model, config) -> handle``.

``sparsify`` is four named phases, each a function with one job:

1. ``plan``: the corrections measure their statistics on calibration text (smoothing maxima), and
   the policy chooses the sparse layers (measuring sensitivities if it ranks by them);
2. ``insert``: each target layer is replaced by a ``SparseLinear``;
3. ``fit``: the corrections that learn are fitted on the attached model;
4. ``fold``: what was learned is folded into each layer's sparse-call weight, bias and factor.

A recipe replaces phases 1 and 3 with what it saved.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from actsparse.calibration.fitting import Fitter
from actsparse.calibration.measure import Measurements
from actsparse.calibration.sensitivity import layer_output_kl, layer_sensitivity, sensitivity_config
from actsparse.config import CalibrationSettings, SparsityConfig
from actsparse.core.errors import ActsparseError
from actsparse.io.recipe import Recipe
from actsparse.pieces.base import LayerChoice
from actsparse.sparse.handle import SparsityHandle
from actsparse.sparse.layer import SparseLinear
from actsparse.sparse.targets import linear_flops, linear_layers, target_layers


@dataclass(frozen=True)
class Plan:
    """What planning decided: the layers the policy chose (sparse at ``config.pattern``; the other
    candidates take ``config.rest_pattern``), per-layer calibration statistics, and the
    sensitivities the policy measured (None when it measured none)."""

    sparse_layers: list[str]
    statistics: dict[str, dict[str, torch.Tensor]]
    sensitivity: dict[str, float] | None


def _statistics(
    model: nn.Module, config: SparsityConfig, candidates: dict[str, nn.Linear], measurements: Measurements
) -> dict[str, dict[str, torch.Tensor]]:
    """Every correction's per-layer statistics (smoothing maxima), each measured once."""
    statistics: dict[str, dict[str, torch.Tensor]] = {}
    for correction in config.corrections:
        for name, values in correction.measure(model, candidates, measurements).items():
            statistics.setdefault(name, {}).update(values)
    return statistics


def _sensitivity(
    model: nn.Module,
    config: SparsityConfig,
    candidates: dict[str, nn.Linear],
    statistics: dict[str, dict[str, torch.Tensor]],
    measurements: Measurements,
) -> dict[str, float]:
    """The candidates' sensitivities, measured once per distinct pattern, criterion, training-free
    corrections and layers on the windows of ``measurements``."""
    key = ("sensitivity", sensitivity_config(config).to_dict(), sorted(candidates))
    return measurements.get(
        key,
        lambda windows: layer_sensitivity(
            model, windows, candidates, config, statistics, measurements.batch_size
        ),
    )


def _output_kl(
    model: nn.Module,
    config: SparsityConfig,
    candidates: dict[str, nn.Linear],
    statistics: dict[str, dict[str, torch.Tensor]],
    measurements: Measurements,
    windows: int,
) -> dict[str, float]:
    """The model's output KL with each candidate alone sparse, on the first ``windows`` windows of
    ``measurements``; kept in the cache folder, since it takes minutes."""
    key = ("output_kl", sensitivity_config(config).to_dict(), sorted(candidates), windows)
    return measurements.get(
        key,
        lambda calibration: layer_output_kl(
            model, calibration, candidates, config, statistics, windows, measurements.batch_size
        ),
        stored=model,
        # the first `windows` windows are all it reads, unless a correction's statistics saw more
        reads=None if statistics else windows,
    )


def _layer_choice(
    model: nn.Module,
    config: SparsityConfig,
    candidates: dict[str, nn.Linear],
    statistics: dict[str, dict[str, torch.Tensor]],
    measurements: Measurements,
    measured: dict[str, dict[str, float]],
) -> LayerChoice:
    """What ``config.policy`` chooses from; whatever it measures is also kept in ``measured``."""

    def sensitivity() -> dict[str, float]:
        measured["values"] = _sensitivity(model, config, candidates, statistics, measurements)
        return measured["values"]

    def output_kl(windows: int) -> dict[str, float]:
        measured["values"] = _output_kl(model, config, candidates, statistics, measurements, windows)
        return measured["values"]

    flops = {name: linear_flops(layer) for name, layer in candidates.items()}
    total = sum(linear_flops(layer) for layer in linear_layers(model).values())
    return LayerChoice(flops, total, sensitivity, output_kl)


def measure_sensitivity(
    model: nn.Module, config: SparsityConfig, calibration: torch.Tensor | None, batch_size: int = 1
) -> tuple[dict[str, float], LayerChoice]:
    """Each target layer's cost when sparsified alone, as ``config.policy`` ranks it (the output KL
    for the kl policy, else the relative output error), measured on ``calibration`` windows run
    ``batch_size`` at a time; with the layers' FLOPs it chose from."""
    measurements = Measurements(calibration, batch_size)
    candidates = target_layers(model, config)
    statistics = _statistics(model, config, candidates, measurements)
    choice = _layer_choice(model, config, candidates, statistics, measurements, {})
    return config.policy.costs(choice), choice


def plan(
    model: nn.Module, config: SparsityConfig, candidates: dict[str, nn.Linear], measurements: Measurements
) -> Plan:
    """Phase 1: measure what ``config`` needs on the calibration windows of ``measurements`` (each
    statistic once per ``measurements``) and choose the sparse layers."""
    statistics = _statistics(model, config, candidates, measurements)
    measured: dict[str, dict[str, float]] = {}  # what the policy measured, as the handle describes it
    choice = _layer_choice(model, config, candidates, statistics, measurements, measured)
    chosen = config.policy.choose(choice)
    return Plan(chosen, statistics, measured.get("values"))


def _recipe_plan(recipe: Recipe, candidates: dict[str, nn.Linear]) -> Plan:
    """Phase 1 from a recipe: its layers and statistics as saved."""
    names = [key for correction in recipe.config.corrections for key in correction.statistics]
    statistics = {
        name: {key: recipe.tensor(f"{name}.{key}", (layer.in_features,)) for key in names}
        for name, layer in candidates.items()
    }
    return Plan(recipe.sparse_layers, statistics if names else {}, recipe.sensitivity)


def insert(
    model: nn.Module, config: SparsityConfig, candidates: dict[str, nn.Linear], planned: Plan
) -> SparsityHandle:
    """Phase 2: wrap the planned layers at ``config.pattern`` and the other candidates at
    ``config.rest_pattern`` (when it is dense, only under W8A8), and attach them."""
    chosen = set(planned.sparse_layers)
    patterns = {
        name: config.parsed_pattern if name in chosen else config.parsed_rest_pattern for name in candidates
    }
    wrapped = {
        name: linear
        for name, linear in candidates.items()
        if name in chosen or not patterns[name].dense or config.quant != "none"
    }
    layers: dict[str, SparseLinear] = {}
    try:
        for name, linear in wrapped.items():
            layers[name] = SparseLinear(linear, name, config, planned.statistics.get(name), patterns[name])
    except BaseException:
        for layer in layers.values():  # the originals get their weights back as they were
            layer.backend.detach(layer)
        raise
    _return_freed_memory()
    handle = SparsityHandle(
        model, config, layers, dict(wrapped), planned.sensitivity, statistics=planned.statistics
    )
    return handle.attach()


def _return_freed_memory() -> None:
    """Give the heap pages freed by inserting (the criteria's temporary float32 copies, weights
    replaced by a backend's stored copy) back to the system, where the C library can (glibc's
    ``malloc_trim``); elsewhere nothing happens. Without it they stay counted in the process's
    resident memory until reused."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fit(
    handle: SparsityHandle, windows: torch.Tensor | None, settings: CalibrationSettings | None = None
) -> None:
    """Phase 3: fit the corrections that learn (``learnable``) on ``windows``; on failure the
    model is left dense."""
    fitter = Fitter(handle, windows, settings or CalibrationSettings())
    record: dict = {}
    try:
        for correction in handle.config.corrections:
            record |= correction.fit(handle.layers, fitter) or {}
    except BaseException:
        handle.remove()
        raise
    handle.record_calibration(record or None)


def fold(handle: SparsityHandle) -> None:
    """Phase 4: fold what the corrections learned into every layer's sparse-call operands."""
    for layer in handle.layers.values():
        layer.fold()


def _load_tensors(handle: SparsityHandle, recipe: Recipe) -> None:
    """Phases 3 and 4 from a recipe: every correction's tensors as saved, folded."""
    for name, layer in handle.layers.items():
        for correction in layer.corrections:
            wanted = correction.save_tensors(layer)
            if wanted:
                tensors = {key: recipe.tensor(f"{name}.{key}", value.shape) for key, value in wanted.items()}
                correction.load_tensors(layer, tensors)
    handle.record_calibration(recipe.calibration)


def sparsify(
    model: nn.Module,
    config: SparsityConfig | None = None,
    calibration: torch.Tensor | None = None,
    recipe: Recipe | None = None,
    calibration_settings: CalibrationSettings | None = None,
    measurements: Measurements | None = None,
) -> SparsityHandle:
    """Attach N:M activation sparsity to ``model`` in place and return the handle that undoes it.

    The model stays an ordinary ``nn.Module`` (a transformers model stays one): each target
    ``nn.Linear`` is replaced by a ``SparseLinear`` that shares its parameters (with smoothing,
    W8A8 or learned corrections it holds its own transformed weight as well). Use the handle as a
    context manager, or call ``handle.remove()``, to get the dense model back exactly.

    ``calibration`` (token windows ``(W, T)``, never the evaluation text) is needed when the config
    measures or learns something first: a layer policy other than ``all``, smoothing, or learnable
    corrections (fitted block by block with ``calibration_settings``; see ``actsparse.calibration.fitting``).
    ``measurements`` shares what was measured on the same windows between several calls (it
    replaces ``calibration``). A ``recipe`` (``actsparse.io.recipe.load_recipe``) replaces both
    ``config`` and ``calibration``: its layers and tensors are used as saved, so the logits are
    those of the calibrated model.
    """
    if recipe is not None:
        if config is not None and config != recipe.config:
            raise ActsparseError(
                "Pass either a config or a recipe to sparsify, not both: the recipe carries its own config."
            )
        recipe.check_model(model)
        config = recipe.config
    config = config or SparsityConfig()
    if any(isinstance(module, SparseLinear) for module in model.modules()):
        raise ActsparseError(
            "This model already has sparse layers attached by an earlier sparsify(); call remove() "
            "on that handle before sparsifying it again (handles attach and remove independently)."
        )
    candidates = target_layers(model, config)
    if recipe is not None:
        recipe.check_layers(candidates)
        handle = insert(model, config, candidates, _recipe_plan(recipe, candidates))
        _load_tensors(handle, recipe)
        return handle
    measurements = measurements or Measurements(calibration)
    handle = insert(model, config, candidates, plan(model, config, candidates, measurements))
    fit(handle, measurements.windows, calibration_settings)
    fold(handle)
    return handle
