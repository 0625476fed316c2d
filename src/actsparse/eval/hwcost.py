"""What a sparsity pattern costs and saves in data movement, for hardware architects.

A compressed activation tile stores, per group of M inputs of a token, the N kept values and an index
saying which they are. Two index encodings are counted: the combinatorial one, ``⌈log2 C(M, N)⌉``
bits per group (the fewest possible), and the simple positional one, ``N · ⌈log2 M⌉`` bits (each kept
value's position in its group). An unstructured pattern needs a bitmap of one bit per input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from actsparse.core.errors import ActsparseError
from actsparse.core.patterns import Pattern, parse_pattern

VALUE_BYTES = {"fp16": 2, "int8": 1}
"""Bytes per activation value in the two formats compared."""


@dataclass(frozen=True)
class HardwareCost:
    """Index metadata and bytes moved for one activation tile of ``tokens × channels`` inputs.

    ``io_ratio_*`` is compressed bytes (values and combinatorial index) over dense bytes; below 1
    means less traffic. ``positional_io_ratio_*`` is the same with the positional index.
    """

    pattern: str
    tokens: int
    channels: int
    index_bits_per_group: int | None
    positional_index_bits_per_group: int | None
    dense_bytes_fp16: int
    dense_bytes_int8: int
    compressed_bytes_fp16: int
    compressed_bytes_int8: int
    io_ratio_fp16: float
    io_ratio_int8: float
    positional_io_ratio_fp16: float
    positional_io_ratio_int8: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tile_bytes(pattern: Pattern, tokens: int, channels: int, value_bytes: int, index_bits: int) -> int:
    """Bytes of a compressed tile: kept values plus index bits, rounded up to whole bytes per token."""
    if pattern.unstructured:
        kept = pattern.keep_count(channels)[0]
        bits = kept * value_bytes * 8 + channels  # values, and a bitmap of one bit per input
    else:
        groups = channels // pattern.m
        bits = groups * (pattern.n * value_bytes * 8 + index_bits)
    return tokens * math.ceil(bits / 8)


def hardware_cost(pattern: Pattern | str, tokens: int = 512, channels: int = 4096) -> HardwareCost:
    """Index bits and bytes moved for a ``tokens × channels`` activation tile under ``pattern``.

    ``channels`` must be a multiple of M for an N:M pattern (4096, the default, is for all M up to
    4096 that are powers of two).
    """
    pattern = parse_pattern(pattern)
    if pattern.unstructured:
        combinatorial = positional = None
    else:
        if channels % pattern.m:
            raise ActsparseError(
                f"A tile of {channels} channels does not split into groups of M={pattern.m}; "
                "choose a channel count that is a multiple of M."
            )
        combinatorial = math.ceil(math.log2(math.comb(pattern.m, pattern.n)))
        positional = pattern.n * math.ceil(math.log2(pattern.m))
    figures: dict[str, Any] = {}
    for name, value_bytes in VALUE_BYTES.items():
        dense = tokens * channels * value_bytes
        compact = _tile_bytes(pattern, tokens, channels, value_bytes, combinatorial or 0)
        simple = _tile_bytes(pattern, tokens, channels, value_bytes, positional or 0)
        figures |= {
            f"dense_bytes_{name}": dense,
            f"compressed_bytes_{name}": compact,
            f"io_ratio_{name}": compact / dense,
            f"positional_io_ratio_{name}": simple / dense,
        }
    return HardwareCost(
        pattern=str(pattern),
        tokens=tokens,
        channels=channels,
        index_bits_per_group=combinatorial,
        positional_index_bits_per_group=positional,
        **figures,
    )
