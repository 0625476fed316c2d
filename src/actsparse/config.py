"""``SparsityConfig``: everything that defines one activation-sparsity setting, as plain data."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from actsparse.criteria import get_criterion
from actsparse.errors import ActsparseError
from actsparse.patterns import Pattern, parse_pattern

DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
"""The decoder's attention and MLP projections in Llama, Gemma, Qwen2, Mistral and their kin."""

PHASES = ("prefill", "all")
REMAINDERS = ("error", "dense")


@dataclass(frozen=True)
class SparsityConfig:
    """One activation-sparsity setting.

    Args:
        pattern: ``"N:M"`` (keep N of every M consecutive inputs) or ``"unstructured:<density>"``.
        criterion: score used to choose the kept inputs: magnitude, wina, amber, clact or variance.
        phase: ``"prefill"`` sparsifies only calls that process more than one token per sequence
            (prompt processing; decode stays dense), ``"all"`` every call.
        include: regular expressions; a linear layer is a target if its name matches any of them.
        exclude: regular expressions; a matching layer is never a target. The LM head never is.
        remainder: what to do when a layer's input width is not a multiple of M: ``"error"``
            refuses, ``"dense"`` keeps the last ``in % M`` inputs dense.
    """

    pattern: str = "8:16"
    criterion: str = "amber"
    phase: Literal["prefill", "all"] = "prefill"
    include: tuple[str, ...] = (DEFAULT_TARGETS,)
    exclude: tuple[str, ...] = ()
    remainder: Literal["error", "dense"] = "error"
    parsed_pattern: Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed_pattern", parse_pattern(self.pattern))
        object.__setattr__(self, "pattern", str(self.parsed_pattern))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        get_criterion(self.criterion)
        if self.phase not in PHASES:
            raise ActsparseError(f"Unknown phase '{self.phase}'; choose 'prefill' or 'all'.")
        if self.remainder not in REMAINDERS:
            raise ActsparseError(f"Unknown remainder policy '{self.remainder}'; choose 'error' or 'dense'.")
        for expression in (*self.include, *self.exclude):
            try:
                re.compile(expression)
            except re.error as error:
                raise ActsparseError(
                    f"Layer filter '{expression}' is not a valid regular expression ({error}); fix or quote it."
                ) from None

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``"8:16 amber"``."""
        return f"{self.pattern} {self.criterion}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``SparsityConfig.from_dict`` reads it back."""
        data = asdict(self)
        data.pop("parsed_pattern")
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        return cls(**data)
