"""Which layers to sparsify: sensitivity analysis and the layer policies (REFERENCE §4).

- ``all``: every target layer.
- ``amber``: Amber Pruner's published rule — skip k, v, o and up; always sparsify down; sparsify q
  and gate except in (up to ``amber_skip`` of) the layers where each is most sensitive, keeping at
  least ``flop_share`` of the linear FLOPs sparse.
- ``budget``: the set of target layers that reaches ``flop_share`` of the linear FLOPs with the least
  total sensitivity (greedy by sensitivity per FLOP, then dropping what the target does not need).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from actsparse.calibration import observe_inputs
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.layers import SparseLinear

_EPS = 1e-12


def layer_sensitivity(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    config: SparsityConfig,
    input_max: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Relative output error ``‖Y − Y'‖₂ / ‖Y‖₂`` of each layer when only its own input is made
    sparse under ``config`` (smoothing included, quantisation not), over all calibration tokens.

    ``input_max`` (per-channel calibration maxima) is needed when ``config`` smooths.
    """
    sparsity_only = replace(config, quant="none", policy="all")
    sparse = {
        name: SparseLinear(linear, name, sparsity_only, (input_max or {}).get(name))
        for name, linear in layers.items()
    }
    error = dict.fromkeys(layers, 0.0)
    norm = dict.fromkeys(layers, 0.0)

    def observe(name: str, x: torch.Tensor) -> None:
        dense_out = F.linear(x, layers[name].weight, layers[name].bias)
        sparse_out = sparse[name](x[None])[0]  # one sequence of many tokens: the prefill path
        error[name] += (dense_out - sparse_out).float().pow(2).sum().item()
        norm[name] += dense_out.float().pow(2).sum().item()

    observe_inputs(model, windows, layers, observe, f"sensitivity of {len(layers)} layers")
    return {name: math.sqrt(error[name]) / (math.sqrt(norm[name]) + _EPS) for name in layers}


def projection(name: str) -> str:
    """``"q_proj"`` for ``"model.layers.3.self_attn.q_proj"``."""
    return name.rsplit(".", 1)[-1]


def amber_layers(
    sensitivity: dict[str, float], flops: dict[str, int], total_flops: int, share: float, skip: int
) -> list[str]:
    """Amber Pruner's rule: down always; q and gate except in their most sensitive layers; never k,
    v, o or up. Up to ``skip`` q and ``skip`` gate layers are skipped, most sensitive first, as long
    as the sparse layers keep at least ``share`` of ``total_flops`` (the published 5 skipped layers
    assume 32 blocks; on shallower models fewer keep the share above 55%)."""
    chosen = [name for name in sensitivity if projection(name) in ("q_proj", "gate_proj", "down_proj")]
    if not chosen:
        raise ActsparseError(
            "The amber policy found no q_proj, gate_proj or down_proj among the target layers; "
            "use --policy all or budget for this model."
        )
    covered = sum(flops[name] for name in chosen)
    skipped = {"q_proj": 0, "gate_proj": 0}
    optional = [name for name in chosen if projection(name) in skipped]
    for name in sorted(optional, key=sensitivity.__getitem__, reverse=True):
        kind = projection(name)
        if skipped[kind] < skip and covered - flops[name] >= share * total_flops:
            chosen.remove(name)
            covered -= flops[name]
            skipped[kind] += 1
    return chosen


def budget_layers(
    sensitivity: dict[str, float], flops: dict[str, int], total_flops: int, share: float
) -> list[str]:
    """The candidate layers reaching ``share`` of ``total_flops`` with the least total sensitivity."""
    target = share * total_flops
    if sum(flops[n] for n in sensitivity) < target:
        reachable = sum(flops[n] for n in sensitivity) / total_flops
        raise ActsparseError(
            f"The target layers cover only {reachable:.1%} of linear FLOPs, short of --flop-share {share:g}; "
            "lower the share or widen --include."
        )
    chosen: list[str] = []
    covered = 0
    for name in sorted(sensitivity, key=lambda n: (sensitivity[n] / flops[n], n)):
        if covered >= target:
            break
        chosen.append(name)
        covered += flops[name]
    for name in sorted(chosen, key=sensitivity.__getitem__, reverse=True):  # drop what is not needed
        if covered - flops[name] >= target:
            chosen.remove(name)
            covered -= flops[name]
    return [name for name in sensitivity if name in chosen]
