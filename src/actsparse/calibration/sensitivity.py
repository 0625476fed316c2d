"""Layer sensitivity: what sparsifying one layer alone does, over calibration tokens.

- ``layer_sensitivity``: the relative error ``‖Y − Y'‖₂ / ‖Y‖₂`` of the layer's own output (what
  the amber and budget policies rank);
- ``layer_output_kl``: the KL divergence of the model's next-token distribution from the dense
  model's (what the kl policy ranks: the layer's effect on everything after it).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibration.measure import observe_inputs
from actsparse.config import SparsityConfig
from actsparse.core.devices import materialized
from actsparse.core.distribution import Totals, dense_reference, next_token_logits
from actsparse.core.errors import ActsparseError
from actsparse.sparse.handle import SparsityHandle
from actsparse.sparse.layer import SparseLinear

_EPS = 1e-12


def sensitivity_config(config: SparsityConfig) -> SparsityConfig:
    """What a sensitivity measures under ``config``: its pattern (each layer alone at it, the rest
    dense, whatever ``rest_pattern``), criterion and training-free corrections (smoothing included),
    emulated, without quantisation and before anything is learned. Calibration windows have many
    tokens, so every call is sparsified under either phase: one measurement serves both."""
    training_free = tuple(c for c in config.corrections if not c.learned)
    return replace(
        config,
        quant="none",
        policy="all",
        rest_pattern="dense",
        backend="emulated",
        corrections=training_free,
        phase="prefill",
    )


def _sparse_alone(
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    statistics: dict[str, dict[str, torch.Tensor]] | None,
) -> dict[str, SparseLinear]:
    """Each of ``layers`` wrapped under ``sensitivity_config(config)``, to be tried one at a time."""
    measured = sensitivity_config(config)
    return {
        name: SparseLinear(linear, name, measured, (statistics or {}).get(name))
        for name, linear in layers.items()
    }


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
    sparse = _sparse_alone(layers, config, statistics)
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


def layer_output_kl(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    statistics: dict[str, dict[str, torch.Tensor]] | None = None,
    count: int = 4,
    batch_size: int = 1,
) -> dict[str, float]:
    """Mean ``KL(p_dense ‖ p)`` per predicted token of the model's next-token distribution when only
    one of ``layers`` is sparsified under ``sensitivity_config(config)``, for each of them, over the
    first ``count`` calibration ``windows`` (``batch_size`` per forward pass). One forward pass per
    layer and batch: the dense distribution of a batch is computed once and held while the layers
    take their turns."""
    if windows is None or len(windows) == 0:
        raise ActsparseError(
            "The kl policy needs calibration text; pass calibration windows (--calib-windows in the CLI)."
        )
    measured = sensitivity_config(config)
    alone = {  # one handle per layer, attached for that layer's passes only
        name: SparsityHandle(model, measured, {name: layer}, {name: layers[name]})
        for name, layer in _sparse_alone(layers, config, statistics).items()
    }
    totals = {name: Totals() for name in layers}
    batches = windows[:count].split(batch_size)
    bar = tqdm(total=len(batches) * len(layers), desc="output KL per layer", unit="pass", leave=False)
    with torch.inference_mode():
        for batch in batches:
            reference = dense_reference(next_token_logits(model, batch))
            targets = batch[:, 1:].flatten()
            for name, handle in alone.items():
                with handle:
                    logits = next_token_logits(model, batch)
                totals[name].add(logits, targets, reference)
                bar.update()
    bar.close()
    return {name: totals[name].kl / totals[name].tokens for name in layers}
