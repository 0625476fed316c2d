"""Layer sensitivity: the relative output error ``‖Y − Y'‖₂ / ‖Y‖₂`` of each layer when only its
own input is made sparse, over all calibration tokens (what the amber and budget policies rank)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.calibration import observe_inputs
from actsparse.config import SparsityConfig
from actsparse.devices import materialized
from actsparse.layers import SparseLinear

_EPS = 1e-12


def sensitivity_config(config: SparsityConfig) -> SparsityConfig:
    """What a sensitivity measures under ``config``: its pattern, criterion and training-free
    corrections (smoothing included), emulated, without quantisation and before anything is learned.
    Calibration windows have many tokens, so every call is sparsified under either phase: one
    measurement serves both."""
    mitigation = tuple(c for c in config.mitigation if not c.learned)
    return replace(
        config, quant="none", policy="all", backend="emulated", mitigation=mitigation, phase="prefill"
    )


def layer_sensitivity(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    statistics: dict[str, dict[str, torch.Tensor]] | None = None,
    batch_size: int = 1,
) -> dict[str, float]:
    """Relative output error of each of ``layers`` sparsified alone under ``sensitivity_config(config)``,
    over ``windows`` run ``batch_size`` at a time.

    ``statistics`` (per layer, e.g. the smoothing maxima) are needed when ``config`` smooths.
    """
    measured = sensitivity_config(config)
    sparse = {
        name: SparseLinear(linear, name, measured, (statistics or {}).get(name))
        for name, linear in layers.items()
    }
    error = dict.fromkeys(layers, 0.0)
    norm = dict.fromkeys(layers, 0.0)

    def observe(name: str, x: torch.Tensor) -> None:
        with materialized(layers[name]):  # an offloaded layer's weights, for this call
            dense_out = F.linear(x, layers[name].weight, layers[name].bias)
        sparse_out = sparse[name](x[None])[0]  # one sequence of many tokens: the prefill path
        error[name] += (dense_out - sparse_out).float().pow(2).sum().item()
        norm[name] += dense_out.float().pow(2).sum().item()

    observe_inputs(
        model, windows, layers, observe, f"sensitivity of {len(layers)} layers", batch_size=batch_size
    )
    return {name: math.sqrt(error[name]) / (math.sqrt(norm[name]) + _EPS) for name in layers}
