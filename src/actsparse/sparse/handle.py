"""``SparsityHandle``: what ``sparsify`` returns — the wrapped layers, and the means to take them
out of the model and put them back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from actsparse.config import SparsityConfig
from actsparse.core.errors import ActsparseError
from actsparse.io.recipe import Recipe, model_fingerprint
from actsparse.sparse.density import DensityCounter
from actsparse.sparse.layer import SparseLinear


@dataclass
class SparsityHandle:
    """The wrapped layers of one sparsification, and what calibration measured or learned for it.

    ``remove()`` puts every original ``nn.Linear`` object back, so the model is bit-for-bit what it
    was; ``attach()`` re-inserts the same prepared layers (no factor is recomputed).
    ``statistics`` holds the per-layer calibration statistics (smoothing maxima), ``sensitivity``
    the per-layer sensitivities a policy measured, ``calibration`` the record of what was learned,
    ``prepare_seconds`` how long ``actsparse.eval.variants.prepare_variants`` took to prepare it.
    """

    model: nn.Module
    config: SparsityConfig
    layers: dict[str, SparseLinear]
    originals: dict[str, nn.Linear]
    sensitivity: dict[str, float] | None = None
    statistics: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    attached: bool = False
    prepare_seconds: float | None = None

    @property
    def label(self) -> str:
        """The configuration's label, and what calibration ran at unlike the defaults (a learning
        rate other than its objective's, ``lr=0.0001``, or the rates it searched, ``lr=0.001,0.0001``),
        so recipes that differ in it are told apart."""
        record = self.calibration or {}
        words = [word for piece in self.config.corrections for word in piece.calibration_label(record)]
        return " ".join([self.config.label, *words])

    @property
    def policy_layers(self) -> list[str]:
        """The layers sparse at ``config.pattern``: all the policy chose (the others are dense or at
        ``config.rest_pattern``)."""
        main = self.config.parsed_pattern
        return [name for name, layer in self.layers.items() if layer.sparse and layer.pattern == main]

    def describe(self) -> dict[str, Any]:
        """The configuration and, under a layer policy, the layers it left out (dense, or at
        ``rest_pattern``) and why."""
        description: dict[str, Any] = {"kind": "activations", **self.config.to_dict()}
        if self.sensitivity is not None:
            description["sensitivity"] = self.sensitivity
            chosen = set(self.policy_layers)
            description["skipped_layers"] = [name for name in self.sensitivity if name not in chosen]
        if self.calibration is not None:
            description["calibration"] = self.calibration
        return description

    def recipe(self) -> Recipe:
        """This sparsification as a recipe: its config, sparse layers and calibrated tensors."""
        tensors = {
            f"{name}.{key}": value.cpu()
            for name, values in self.statistics.items()
            for key, value in values.items()
        }
        for name, layer in self.layers.items():
            for correction in layer.corrections:
                for key, value in correction.save_tensors(layer).items():
                    tensors[f"{name}.{key}"] = value.cpu()
        return Recipe(
            config=self.config,
            model=model_fingerprint(self.model, self.originals),
            sparse_layers=self.policy_layers,
            tensors=tensors,
            sensitivity=self.sensitivity,
            calibration=self.calibration,
        )

    def record_calibration(self, record: dict[str, Any] | None) -> None:
        """Keep what calibration fitted (its record), or what a recipe says was fitted."""
        self.calibration = record

    def record_preparation(self, seconds: float) -> None:
        """Keep how long preparing this handle took (``prepare_variants``)."""
        self.prepare_seconds = seconds

    def _swap_in(self, modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, module)

    def attach(self) -> SparsityHandle:
        """Put the sparse layers into the model (no-op when already attached). Refused while another
        handle's sparse layers hold any of the same places."""
        if not self.attached:
            for name, original in self.originals.items():
                if self.model.get_submodule(name) is not original:
                    raise ActsparseError(
                        f"Another handle's sparse layers are attached at {name}; call remove() on "
                        "that handle before attaching this one (one handle at a time per layer)."
                    )
            self._swap_in(self.layers)
            for layer in self.layers.values():
                layer.backend.attach(layer)
            self.attached = True
        return self

    def remove(self) -> None:
        """Restore the original dense layers (no-op when already removed)."""
        if self.attached:
            for layer in self.layers.values():
                layer.backend.detach(layer)
            self._swap_in(self.originals)
            self.attached = False

    def measure_density(self, enabled: bool = True) -> dict[str, DensityCounter]:
        """Start (or stop) counting the non-zero inputs of every sparsified call, from zero; the
        counters by layer (none when stopped)."""
        counters = {name: DensityCounter() for name in self.layers} if enabled else {}
        for name, layer in self.layers.items():
            layer.count_density(counters.get(name))
        return counters

    def __enter__(self) -> SparsityHandle:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
