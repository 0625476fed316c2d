"""Attach and detach N:M activation sparsity on a model: ``sparsify(model, config) -> handle``."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from actsparse.calibrate import CalibrationSettings, learn_corrections
from actsparse.calibration import input_abs_max
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.layers import SparseLinear
from actsparse.policy import amber_layers, budget_layers, layer_sensitivity
from actsparse.recipe import Recipe, model_fingerprint


def lm_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (its LM head), which is never sparsified."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def linear_flops(layer: nn.Linear) -> int:
    """Multiply-add FLOPs per token of one linear layer: ``2 · in · out``."""
    return 2 * layer.in_features * layer.out_features


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by name, except its LM head."""
    head = lm_head(model)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name
    }


def target_layers(model: nn.Module, config: SparsityConfig) -> dict[str, nn.Linear]:
    """The linear layers ``config`` selects: names matching an include and no exclude expression.

    An include or exclude expression that matches no linear layer is refused, as is an empty result.
    """
    layers = linear_layers(model)
    for kind, expressions in (("include", config.include), ("exclude", config.exclude)):
        for expression in expressions:
            if not any(re.search(expression, name) for name in layers):
                raise ActsparseError(
                    f"The {kind} filter '{expression}' matches no linear layer of this model; "
                    "list the layer names with `actsparse info --model ...` and adjust the filter."
                )
    chosen = {
        name: module
        for name, module in layers.items()
        if any(re.search(e, name) for e in config.include)
        and not any(re.search(e, name) for e in config.exclude)
    }
    if not chosen:
        raise ActsparseError(
            "No linear layer is left to sparsify after the include and exclude filters; "
            "loosen --exclude or widen --include."
        )
    return chosen


@dataclass
class SparsityHandle:
    """What ``sparsify`` returns: the wrapped layers, and the means to take them out and back.

    ``remove()`` puts every original ``nn.Linear`` object back, so the model is bit-for-bit what it
    was; ``attach()`` re-inserts the same prepared layers (no factor is recomputed).
    """

    model: nn.Module
    config: SparsityConfig
    layers: dict[str, SparseLinear]
    originals: dict[str, nn.Linear]
    sensitivity: dict[str, float] | None = None
    input_max: dict[str, torch.Tensor] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    attached: bool = False

    @property
    def label(self) -> str:
        return self.config.label

    def describe(self) -> dict[str, Any]:
        """The configuration and, under a layer policy, the layers it skipped and why."""
        description: dict[str, Any] = {"kind": "activations", **self.config.to_dict()}
        if self.sensitivity is not None:
            description["sensitivity"] = self.sensitivity
            description["skipped_layers"] = [
                name for name in self.sensitivity if not (name in self.layers and self.layers[name].sparse)
            ]
        if self.calibration is not None:
            description["calibration"] = self.calibration
        return description

    def recipe(self) -> Recipe:
        """This sparsification as a recipe: its config, sparse layers and calibrated tensors."""
        tensors = {f"{name}.input_max": maxima for name, maxima in self.input_max.items()}
        for name, layer in self.layers.items():
            if layer.correction is not None:
                for tensor_name, parameter in layer.correction.named_parameters():
                    tensors[f"{name}.correction.{tensor_name}"] = parameter.detach()
        return Recipe(
            config=self.config,
            model=model_fingerprint(self.model),
            sparse_layers=[name for name, layer in self.layers.items() if layer.sparse],
            tensors=tensors,
            sensitivity=self.sensitivity,
            calibration=self.calibration,
        )

    def _swap_in(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, module)

    def attach(self) -> SparsityHandle:
        """Put the sparse layers into the model (no-op when already attached)."""
        if not self.attached:
            self._swap_in(self.layers)
            self.attached = True
        return self

    def remove(self) -> None:
        """Restore the original dense layers (no-op when already removed)."""
        if self.attached:
            self._swap_in(self.originals)
            self.attached = False

    def measure_density(self, enabled: bool = True) -> None:
        """Start (or stop) counting the non-zero inputs of every sparsified call, from zero."""
        for layer in self.layers.values():
            layer.measure_density = enabled
            layer.reset_counters()

    def __enter__(self) -> SparsityHandle:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _plan(
    model: nn.Module,
    config: SparsityConfig,
    candidates: dict[str, nn.Linear],
    calibration: torch.Tensor | None,
) -> tuple[list[str], dict[str, torch.Tensor], dict[str, float] | None]:
    """Measure what ``config`` needs on calibration text: smoothing maxima, and under a layer
    policy the sensitivities and the layers chosen. Returns (sparse layers, maxima, sensitivities)."""
    input_max = {}
    if config.smooth != "none":
        input_max = input_abs_max(model, calibration, candidates, f"{config.smooth} smoothing")
    if config.policy == "all":
        return list(candidates), input_max, None
    sensitivity = layer_sensitivity(model, calibration, candidates, config, input_max)
    flops = {name: linear_flops(layer) for name, layer in candidates.items()}
    total = sum(linear_flops(layer) for layer in linear_layers(model).values())
    if config.policy == "amber":
        chosen = amber_layers(sensitivity, flops, total, config.flop_share, config.amber_skip)
    else:
        chosen = budget_layers(sensitivity, flops, total, config.flop_share)
    return chosen, input_max, sensitivity


def sparsify(
    model: nn.Module,
    config: SparsityConfig | None = None,
    calibration: torch.Tensor | None = None,
    recipe: Recipe | None = None,
    calibration_settings: CalibrationSettings | None = None,
) -> SparsityHandle:
    """Attach N:M activation sparsity to ``model`` in place and return the handle that undoes it.

    The model stays an ordinary ``nn.Module`` (a transformers model stays one): each target
    ``nn.Linear`` is replaced by a ``SparseLinear`` that shares its parameters (with smoothing,
    W8A8 or learned corrections it holds its own transformed weight as well). Use the handle as a
    context manager, or call ``handle.remove()``, to get the dense model back exactly.

    ``calibration`` (token windows ``(W, T)``, never the evaluation text) is needed when the config
    measures or learns something first: a layer policy other than ``all``, smoothing, or learnable
    corrections (fitted block by block with ``calibration_settings``; see ``actsparse.calibrate``).
    A ``recipe`` (``actsparse.recipe.load_recipe``) replaces both ``config`` and ``calibration``:
    its layers and tensors are used as saved, so the logits are those of the calibrated model.
    """
    if recipe is not None:
        if config is not None and config != recipe.config:
            raise ActsparseError(
                "Pass either a config or a recipe to sparsify, not both: the recipe carries its own config."
            )
        recipe.check_model(model)
        config = recipe.config
    config = config or SparsityConfig()
    candidates = target_layers(model, config)
    if recipe is None:
        chosen, input_max, sensitivity = _plan(model, config, candidates, calibration)
    else:
        chosen, sensitivity = recipe.sparse_layers, recipe.sensitivity
        input_max = {}
        if config.smooth != "none":
            input_max = {name: recipe.tensor(f"{name}.input_max") for name in candidates}
    wrapped = candidates if config.quant != "none" else {name: candidates[name] for name in chosen}
    layers = {
        name: SparseLinear(linear, name, config, input_max.get(name), sparse=name in chosen)
        for name, linear in wrapped.items()
    }
    handle = SparsityHandle(model, config, layers, dict(wrapped), sensitivity, input_max=input_max)
    handle.attach()
    if recipe is not None:
        _load_corrections(layers, recipe)
        handle.calibration = recipe.calibration
    elif config.learnable:
        settings = calibration_settings or CalibrationSettings()
        try:
            fits = learn_corrections(handle, calibration, settings)
        except BaseException:
            handle.remove()
            raise
        handle.calibration = {"settings": settings.to_dict(), "blocks": [asdict(fit) for fit in fits]}
    return handle


def _load_corrections(layers: dict[str, SparseLinear], recipe: Recipe) -> None:
    """Set every learned correction from the recipe's tensors and fold it."""
    for name, layer in layers.items():
        if layer.correction is None:
            continue
        for tensor_name, parameter in layer.correction.named_parameters():
            parameter.copy_(recipe.tensor(f"{name}.correction.{tensor_name}"))
        layer.fold()
