"""The linear layers of a model and which of them a config targets."""

from __future__ import annotations

import re

from torch import nn

from actsparse.config import SparsityConfig
from actsparse.core.errors import ActsparseError


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
    filters = (
        ("include", config.include),
        ("exclude", config.exclude),
        ("quant_exclude", config.quant_exclude),
    )
    for kind, expressions in filters:
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
