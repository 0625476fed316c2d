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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from actsparse.config import SparsityConfig
from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.paths import (
    atomic_directory,
    check_replaceable,
    check_writable,
    honour_umask,
    write_json_atomic,
)

RECIPE_FILE = "recipe.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)
"""Format 1 (actsparse 0.1) kept policy and correction settings flat in its config; format 2 nested
them. Format 3 adds the checksum of ``recipe.json`` itself and a sample of the model's weights, so an
edited recipe, or one on a model of the same shapes with other weights, is refused. Format 4 names
the corrections ``corrections`` (``mitigation`` before). All of them load."""
SAMPLES_PER_LAYER = 8
"""Values of each linear layer's weight in a recipe's weight sample, evenly spaced over the weight."""
SAMPLE_TOLERANCE = 1 / 64
"""Relative difference within which a weight sample matches: the same weights loaded in float32,
bfloat16 or float16 differ by less than 1/256; another seed or a fine-tune by far more."""


def _linear_weights(model: nn.Module, originals: Mapping[str, nn.Module]) -> dict[str, nn.Linear]:
    """Every linear layer by name, the original layer where a sparse one replaces it."""
    return {
        name: originals.get(name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def weight_sample(model: nn.Module, originals: Mapping[str, nn.Module] | None = None) -> list[float] | None:
    """``SAMPLES_PER_LAYER`` values evenly spaced over each linear layer's weight, in float32: a
    cheap digest of the weights (a few values per layer, no pass over them). None when some weights
    are offloaded (on the meta device) and cannot be read."""
    values = []
    for layer in _linear_weights(model, originals or {}).values():
        weight = layer.weight.detach()
        if weight.device.type == "meta":
            return None
        flat = weight.flatten()
        spacing = (flat.numel() - 1) / (SAMPLES_PER_LAYER - 1)
        index = torch.tensor([round(i * spacing) for i in range(SAMPLES_PER_LAYER)], device=flat.device)
        values.append(flat[index].float())
    return [float(f"{value:.6g}") for value in torch.cat(values).cpu().tolist()] if values else []


def model_fingerprint(model: nn.Module, originals: Mapping[str, nn.Module] | None = None) -> dict[str, Any]:
    """What a recipe must match: the model type, the names and shapes of all its linear layers, and
    a sample of their weights (``weight_sample``; ``originals`` are the dense layers that sparse
    ones replace, when a handle is attached)."""
    digest = hashlib.sha256()
    for name, module in _linear_weights(model, originals or {}).items():
        digest.update(f"{name}:{module.in_features}:{module.out_features};".encode())
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "name_or_path": str(getattr(config, "_name_or_path", "")),
        "linear_layers_sha256": digest.hexdigest(),
        "weight_sample": weight_sample(model, originals),
    }


def _description_sha256(description: Mapping[str, Any]) -> str:
    """The checksum of a recipe's JSON: every field but the checksum itself, in canonical form."""
    fields = {key: value for key, value in description.items() if key != "recipe_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


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

    RUN_SETTINGS = ("backend", "phase")
    """The settings a recipe may be run with other than those it was calibrated with: they change
    how and when its products are computed, not what was calibrated."""

    def computed(self, **settings: str) -> Recipe:
        """The same recipe with other ``RUN_SETTINGS``: another backend (``backend="cpu-kernel"``)
        or other calls sparse (``phase="all"``: decode steps too)."""
        if unknown := sorted(set(settings) - set(self.RUN_SETTINGS)):
            raise ActsparseError(
                f"A recipe's {', '.join(unknown)} is part of what was calibrated; only its "
                f"{' and '.join(self.RUN_SETTINGS)} can change, so calibrate a recipe with the other setting."
            )
        return replace(self, config=replace(self.config, **settings))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model other than the one the recipe was calibrated for: another type, other
        linear layers, or (recipes of format 3) other weights of the same shapes."""
        found = model_fingerprint(model)
        other = f"{found['model_type']} '{found['name_or_path']}'"
        if found["model_type"] != self.model["model_type"] or (
            found["linear_layers_sha256"] != self.model["linear_layers_sha256"]
        ):
            raise ActsparseError(
                f"This recipe was calibrated for another model ({self.model['model_type']} "
                f"'{self.model['name_or_path']}'), not this {other}; load it with that model or "
                "calibrate a recipe for this one."
            )
        saved, sample = self.model.get("weight_sample"), found["weight_sample"]
        if saved is not None and sample is not None and not torch.allclose(
            torch.tensor(sample), torch.tensor(saved), rtol=SAMPLE_TOLERANCE, atol=1e-6
        ):
            raise ActsparseError(
                f"This recipe was calibrated for a model of the same layers as this {other} but with "
                f"other weights ('{self.model['name_or_path']}'; another checkpoint, seed or fine-tune); "
                "load it with that model or calibrate a recipe for this one."
            )

    def check_layers(self, candidates: Mapping[str, nn.Module]) -> None:
        """Refuse a recipe whose sparse layers are not all target layers of the model."""
        if missing := [name for name in self.sparse_layers if name not in candidates]:
            raise ActsparseError(
                f"The recipe sparsifies {len(missing)} layer(s) this model has no target layer of "
                f"(first: '{shorten(missing[0])}'), so the recipe does not belong to it or was edited; "
                "calibrate a recipe for this model."
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
            description = json.loads(json.dumps(description))  # the checksum is of what is read back
            description["recipe_sha256"] = _description_sha256(description)
            write_json_atomic(scratch / RECIPE_FILE, description)


def is_recipe_folder(path: Path) -> bool:
    """True when ``path`` is a folder that ``Recipe.save`` wrote (it holds ``recipe.json``)."""
    return (path / RECIPE_FILE).is_file()


def check_recipe_target(directory: Path | str) -> None:
    """Refuse, before any work, a recipe path where saving would replace something not a recipe, or
    that cannot be written."""
    check_replaceable(Path(directory), is_recipe_folder)
    check_writable(Path(directory) / RECIPE_FILE)


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
                f"formats {', '.join(map(str, READABLE_FORMATS[:-1]))} and {READABLE_FORMATS[-1]}; "
                "calibrate it again with this version."
            )
        edited = description.get("recipe_sha256") != _description_sha256(description)
        if description["format"] >= 3 and edited:
            raise ActsparseError(
                f"{description_path} was edited or damaged (its checksum differs from its content); "
                "calibrate the recipe again rather than editing it (`actsparse calibrate`)."
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
