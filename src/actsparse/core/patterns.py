"""Sparsity patterns: ``N:M`` (keep N of every M consecutive inputs) and ``unstructured:<density>``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from actsparse.core.errors import ActsparseError, shorten

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED = re.compile(r"^\s*unstructured\s*:\s*([0-9]*\.?[0-9]+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """Keep ``n`` of every ``m`` consecutive inputs of a token, or, when ``unstructured``, the top
    ``density`` share of the whole input row (``n`` and ``m`` are then unused)."""

    n: int = 0
    m: int = 0
    unstructured_density: float | None = None

    @property
    def unstructured(self) -> bool:
        return self.unstructured_density is not None

    @property
    def dense(self) -> bool:
        """True for the pattern that keeps everything (``"dense"``, i.e. 1:1)."""
        return not self.unstructured and self.n == self.m == 1

    @property
    def density(self) -> float:
        """Share of inputs kept."""
        return self.unstructured_density if self.unstructured else self.n / self.m

    def keep_count(self, width: int) -> tuple[int, int]:
        """``(n, m)`` to apply over a row of ``width`` inputs: the pattern itself, or for an
        unstructured pattern the top ``round(density * width)`` of the whole row."""
        if self.unstructured:
            return max(1, round(self.unstructured_density * width)), width
        return self.n, self.m

    def __str__(self) -> str:
        if self.dense:
            return "dense"
        return f"unstructured:{self.unstructured_density:g}" if self.unstructured else f"{self.n}:{self.m}"


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse ``"8:16"``, ``"unstructured:0.5"`` or ``"dense"`` (keep all: for quantisation alone);
    refuse anything else with a clear message."""
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str):
        raise ActsparseError(
            f"Pattern {text!r} is a {type(text).__name__}, not text; write it as a string, e.g. '8:16'."
        )
    if text.strip() == "dense":
        return Pattern(n=1, m=1)
    if match := _NM.match(text):
        n, m = int(match[1]), int(match[2])
        if not 1 <= n <= m:
            raise ActsparseError(
                f"Pattern '{text}' keeps {n} of {m}; N:M needs 1 <= N <= M (e.g. 2:4, 8:16)."
            )
        return Pattern(n=n, m=m)
    if match := _UNSTRUCTURED.match(text):
        density = float(match[1])
        if not 0 < density <= 1:
            raise ActsparseError(
                f"Pattern '{text}' has density {density:g}; use a density in (0, 1], e.g. unstructured:0.5."
            )
        return Pattern(unstructured_density=density)
    raise ActsparseError(
        f"Pattern '{shorten(text)}' is not understood; write N:M (keep N of every M, e.g. 8:16), "
        "unstructured:<density> (e.g. unstructured:0.5) or dense."
    )
