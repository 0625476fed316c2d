"""Which layers to sparsify: the layer policies, each one registered piece.

- ``all``: every target layer.
- ``amber``: Amber Pruner's published rule — skip k, v, o and up; always sparsify down; sparsify q
  and gate except in (up to ``amber_skip`` of) the layers where each is most sensitive, keeping at
  least ``flop_share`` of the linear FLOPs sparse.
- ``budget``: the set of target layers that reaches ``flop_share`` of the linear FLOPs with the least
  total sensitivity (greedy by sensitivity per FLOP, then dropping what the target does not need).
- ``kl``: the same choice by each layer's end-to-end effect: the KL divergence of the model's
  next-token distribution from the dense one when that layer alone is sparse.

Add a policy with a frozen dataclass subclass of ``Policy`` (its fields are its settings) and
``@POLICIES.register``; ``choose`` gets the candidate layers, their FLOPs and, on demand, their
sensitivities (measured once per run and shared by every variant that asks for the same ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from actsparse.core.errors import ActsparseError
from actsparse.core.registry import setting
from actsparse.pieces.base import POLICIES, LayerChoice, Policy


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


def least_cost_by_share(
    costs: dict[str, float], flops: dict[str, int], total_flops: int, shares: list[float]
) -> list[dict[str, float]]:
    """For each share of ``total_flops``, the set of layers ``budget_layers`` chooses and the sum of
    their ``costs`` (each measured alone), up to the share the candidates reach."""
    reachable = sum(flops.values()) / total_flops
    frontier = []
    for share in shares:
        if share > reachable:
            break
        chosen = budget_layers(costs, flops, total_flops, share)
        frontier.append(
            {
                "flop_share": share,
                "sparse_flop_share": sum(flops[name] for name in chosen) / total_flops,
                "layers": len(chosen),
                "summed_cost": sum(costs[name] for name in chosen),
            }
        )
    return frontier


_SHARE_HELP = (
    "Share of linear FLOPs (LM head excluded) the amber, budget and kl policies keep sparse at pattern "
    "(the rest dense, or at rest_pattern)."
)


def _check_share(share: float) -> None:
    if not 0 < share <= 1:
        raise ActsparseError(f"flop_share {share:g} is outside (0, 1]; use e.g. 0.55.")


@POLICIES.register
@dataclass(frozen=True)
class AllLayers(Policy):
    name: ClassVar[str] = "all"
    description: ClassVar[str] = "every target layer"

    def choose(self, choice: LayerChoice) -> list[str]:
        return list(choice.flops)


@POLICIES.register
@dataclass(frozen=True)
class AmberRule(Policy):
    name: ClassVar[str] = "amber"
    description: ClassVar[str] = "Amber Pruner's rule: down always, q and gate but their most sensitive"
    needs_calibration: ClassVar[bool] = True
    flop_share: float = setting(0.55, _SHARE_HELP)
    amber_skip: int = setting(5, "Most sensitive q and gate layers each that the amber policy may skip.")

    def check(self) -> None:
        _check_share(self.flop_share)
        if self.amber_skip < 0:
            raise ActsparseError(f"amber_skip {self.amber_skip} is negative; use 0 or more (5 is published).")

    def choose(self, choice: LayerChoice) -> list[str]:
        return amber_layers(
            choice.sensitivity(), choice.flops, choice.total_flops, self.flop_share, self.amber_skip
        )


@POLICIES.register
@dataclass(frozen=True)
class Budget(Policy):
    name: ClassVar[str] = "budget"
    description: ClassVar[str] = "the least sensitive set of layers reaching flop_share"
    needs_calibration: ClassVar[bool] = True
    flop_share: float = setting(0.55, _SHARE_HELP)

    def check(self) -> None:
        _check_share(self.flop_share)

    def choose(self, choice: LayerChoice) -> list[str]:
        return budget_layers(choice.sensitivity(), choice.flops, choice.total_flops, self.flop_share)


@POLICIES.register
@dataclass(frozen=True)
class OutputKl(Policy):
    name: ClassVar[str] = "kl"
    description: ClassVar[str] = "the set of layers reaching flop_share whose output KL, each alone, is least"
    needs_calibration: ClassVar[bool] = True
    cost_name: ClassVar[str] = "output KL"
    flop_share: float = setting(0.55, _SHARE_HELP)
    kl_windows: int = setting(
        4, "Calibration windows on which the kl policy measures each layer's output KL."
    )

    def check(self) -> None:
        _check_share(self.flop_share)
        if self.kl_windows < 1:
            raise ActsparseError(f"kl_windows {self.kl_windows} must be at least 1; use e.g. 4.")

    def costs(self, choice: LayerChoice) -> dict[str, float]:
        return choice.output_kl(self.kl_windows)

    def choose(self, choice: LayerChoice) -> list[str]:
        return budget_layers(self.costs(choice), choice.flops, choice.total_flops, self.flop_share)
