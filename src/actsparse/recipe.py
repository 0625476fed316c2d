"""Sparsity recipes: a configuration plus every tensor calibrated for one model, saved as a folder.

A recipe folder holds ``recipe.json`` (the configuration, the sparse layers a policy chose, the
model it belongs to, how it was calibrated, and the SHA-256 of the tensors) and
``tensors.safetensors`` (smoothing maxima and learned corrections). ``sparsify(model,
recipe=load_recipe(folder))`` reproduces the calibrated model's logits bit for bit without any
calibration text. Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.paths import atomic_directory, check_replaceable, honour_umask, write_json_atomic

RECIPE_FILE = "recipe.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT = 2
READABLE_FORMATS = (1, 2)
"""Format 1 (actsparse 0.1) kept policy and mitigation settings flat in its config; it still loads."""


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """What a recipe must match: the model type and the names and shapes of all its linear layers."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            digest.update(f"{name}:{module.in_features}:{module.out_features};".encode())
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "name_or_path": str(getattr(config, "_name_or_path", "")),
        "linear_layers_sha256": digest.hexdigest(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Recipe:
    """A configuration, the layers it sparsifies, and its calibrated tensors, for one model.

    ``sparse_layers`` are the layers the policy chose, sparse at ``config.pattern``; the config's
    other target layers take its ``rest_pattern``. Tensor names are ``<layer>.input_max``
    (smoothing) and ``<layer>.correction.<name>`` (learned).
    """

    config: SparsityConfig
    model: dict[str, str]
    sparse_layers: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sensitivity: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None

    def tensor(self, name: str, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor ``name`` (of ``shape``, when given); a recipe without it, or with another
        shape, is refused as incomplete or damaged."""
        if name not in self.tensors:
            raise ActsparseError(
                f"The recipe lacks the tensor '{name}', so it is incomplete; calibrate it again with "
                "`actsparse calibrate`."
            )
        tensor = self.tensors[name]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ActsparseError(
                f"The recipe's tensor '{name}' has shape {tuple(tensor.shape)} where the layer needs "
                f"{tuple(shape)}, so the recipe is damaged; calibrate it again with `actsparse calibrate`."
            )
        return tensor

    def with_backend(self, backend: str) -> Recipe:
        """The same recipe computed by another backend (``"emulated"`` or ``"cpu-kernel"``)."""
        return replace(self, config=replace(self.config, backend=backend))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one the recipe was calibrated for."""
        found = model_fingerprint(model)
        if found["model_type"] != self.model["model_type"] or (
            found["linear_layers_sha256"] != self.model["linear_layers_sha256"]
        ):
            raise ActsparseError(
                f"This recipe was calibrated for another model ({self.model['model_type']} "
                f"'{self.model['name_or_path']}'), not this {found['model_type']} "
                f"'{found['name_or_path']}'; load it with that model or calibrate a recipe for this one."
            )

    needs_calibration = False
    """A recipe carries what calibration measured; attaching it needs no calibration text."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON part of the recipe (everything but the tensors)."""
        return {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "model": self.model,
            "sparse_layers": self.sparse_layers,
            "sensitivity": self.sensitivity,
            "calibration": self.calibration,
        }

    def save(self, directory: Path | str) -> None:
        """Write the recipe folder atomically. An existing recipe folder is replaced only on success;
        anything else at ``directory`` (a file, a folder with other files) is refused, untouched."""
        with atomic_directory(Path(directory), is_recipe_folder) as scratch:
            tensors = {name: tensor.detach().contiguous() for name, tensor in self.tensors.items()}
            save_file(tensors, scratch / TENSORS_FILE)
            honour_umask(scratch / TENSORS_FILE)
            description = self.to_dict() | {"tensors_sha256": _sha256(scratch / TENSORS_FILE)}
            write_json_atomic(scratch / RECIPE_FILE, description)


def is_recipe_folder(path: Path) -> bool:
    """True when ``path`` is a folder that ``Recipe.save`` wrote (it holds ``recipe.json``)."""
    return (path / RECIPE_FILE).is_file()


def check_recipe_target(directory: Path | str) -> None:
    """Refuse, before any work, a recipe path where saving would replace something not a recipe."""
    check_replaceable(Path(directory), is_recipe_folder)


def load_recipe(directory: Path | str) -> Recipe:
    """Read a recipe folder written by ``Recipe.save`` (or ``actsparse calibrate --out``)."""
    directory = Path(directory)
    description_path, tensors_path = directory / RECIPE_FILE, directory / TENSORS_FILE
    for path in (description_path, tensors_path):
        if not path.is_file():
            raise ActsparseError(
                f"{path} does not exist, so {directory} is not a recipe folder; write one with "
                "`actsparse calibrate --out DIR`."
            )
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
        if not isinstance(description, dict):
            raise TypeError("not a JSON object")
        if description.get("format") not in READABLE_FORMATS:
            raise ActsparseError(
                f"{directory} is a recipe of format {description.get('format')}, this actsparse reads "
                f"formats {' and '.join(map(str, READABLE_FORMATS))}; calibrate it again with this version."
            )
        config = SparsityConfig.from_dict(description["config"])
        expected_sha256 = description["tensors_sha256"]
        model, sparse_layers = description["model"], list(description["sparse_layers"])
    except ActsparseError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSON, UTF-8, missing keys
        raise ActsparseError(
            f"{description_path} is corrupted ({type(error).__name__}: {error}); calibrate the recipe again."
        ) from None
    if _sha256(tensors_path) != expected_sha256:
        raise ActsparseError(
            f"{tensors_path} is corrupted or truncated (its checksum differs from the one in "
            f"{RECIPE_FILE}); calibrate the recipe again."
        )
    try:
        tensors = load_file(tensors_path)
    except SafetensorError as error:
        raise ActsparseError(
            f"{tensors_path} is not a valid safetensors file ({error}); calibrate again."
        ) from None
    return Recipe(
        config=config,
        model=model,
        sparse_layers=sparse_layers,
        tensors=tensors,
        sensitivity=description.get("sensitivity"),
        calibration=description.get("calibration"),
    )
