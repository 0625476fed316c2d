"""Density counting: the share of non-zero inputs over a layer's sparsified calls, as evaluation
measures it (``SparsityHandle.measure_density``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DensityCounter:
    """The kept and the seen inputs of one layer's sparsified calls since counting began."""

    kept: int = 0
    seen: int = 0

    def add(self, kept: int, seen: int) -> None:
        """Count one sparsified call's kept and seen inputs."""
        self.kept += kept
        self.seen += seen

    @property
    def density(self) -> float | None:
        """The share of kept inputs, or None before any sparsified call."""
        return self.kept / self.seen if self.seen else None
