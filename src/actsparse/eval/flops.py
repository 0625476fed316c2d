"""Compute accounting: which share of the linear-layer FLOPs gets sparse inputs, and how much goes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from actsparse.sparse.handle import SparsityHandle
from actsparse.sparse.targets import linear_flops, linear_layers, lm_head


@dataclass(frozen=True)
class LayerFlops:
    """One linear layer: its multiply-add FLOPs per token and, when sparse, its input density."""

    name: str
    in_features: int
    out_features: int
    flops_per_token: int
    sparse: bool
    nominal_density: float = 1.0
    measured_density: float | None = None


@dataclass(frozen=True)
class FlopReport:
    """Per-token FLOPs of the model's linear layers (LM head apart), with the sparse share.

    ``sparse_share`` is the share of linear FLOPs (LM head excluded) whose inputs are sparse;
    ``removed_share`` the share that disappears at the pattern's density; ``measured_removed_share``
    the same at the density measured on real text (None before any sparse call was measured).
    """

    layers: list[LayerFlops]
    lm_head_flops_per_token: int

    @property
    def linear_flops_per_token(self) -> int:
        return sum(layer.flops_per_token for layer in self.layers)

    @property
    def sparse_flops_per_token(self) -> int:
        return sum(layer.flops_per_token for layer in self.layers if layer.sparse)

    @property
    def sparse_share(self) -> float:
        return self.sparse_flops_per_token / self.linear_flops_per_token

    @property
    def sparse_share_with_lm_head(self) -> float:
        return self.sparse_flops_per_token / (self.linear_flops_per_token + self.lm_head_flops_per_token)

    @property
    def removed_share(self) -> float:
        removed = sum(l.flops_per_token * (1 - l.nominal_density) for l in self.layers if l.sparse)
        return removed / self.linear_flops_per_token

    @property
    def measured_density(self) -> float | None:
        """FLOP-weighted density of the sparse layers' inputs, as measured (None before a measure)."""
        sparse = [l for l in self.layers if l.sparse]
        if not sparse or any(l.measured_density is None for l in sparse):
            return None
        return sum(l.flops_per_token * l.measured_density for l in sparse) / self.sparse_flops_per_token

    @property
    def measured_removed_share(self) -> float | None:
        density = self.measured_density
        if density is None:
            return None
        return (1 - density) * self.sparse_flops_per_token / self.linear_flops_per_token

    def summary(self) -> dict[str, Any]:
        """The totals, JSON-ready."""
        return {
            "linear_flops_per_token": self.linear_flops_per_token,
            "lm_head_flops_per_token": self.lm_head_flops_per_token,
            "sparse_share": self.sparse_share,
            "sparse_share_with_lm_head": self.sparse_share_with_lm_head,
            "removed_share": self.removed_share,
            "measured_density": self.measured_density,
            "measured_removed_share": self.measured_removed_share,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "layers": [asdict(layer) for layer in self.layers]}


def flop_report(model: nn.Module, handle: SparsityHandle | None = None) -> FlopReport:
    """Account the linear FLOPs of ``model`` (attached or not) for the layers ``handle`` sparsifies.

    ``handle`` may also be a weight-pruning handle: its layers carry the same ``sparse``,
    ``nominal_density`` and ``measured_density`` (of the weights, then).

    A call that skips sparsity (a decode step under ``phase="prefill"``) is not counted here: the
    figures are per prefill token.
    """
    wrapped = handle.layers if handle is not None else {}
    rows = []
    for name, module in linear_layers(model).items():
        layer = wrapped.get(name)
        sparse = layer is not None and layer.sparse
        rows.append(
            LayerFlops(
                name=name,
                in_features=module.in_features,
                out_features=module.out_features,
                flops_per_token=linear_flops(module),
                sparse=sparse,
                nominal_density=layer.nominal_density if sparse else 1.0,
                measured_density=layer.measured_density if sparse else None,
            )
        )
    head = lm_head(model)
    head_flops = linear_flops(head) if isinstance(head, nn.Linear) else 0
    return FlopReport(layers=rows, lm_head_flops_per_token=head_flops)
