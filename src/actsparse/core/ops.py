"""The N:M operator: keep the top-N scores of every M consecutive inputs of each token row."""

from __future__ import annotations

import torch

from actsparse.core.patterns import Pattern


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the ``n`` highest scores in each group of ``m`` along the last dimension.

    The last dimension must be a multiple of ``m``. Exactly ``n`` entries per group are kept; among
    equal scores the lower index wins, so the result is deterministic.
    """
    groups = scores.reshape(-1, m)
    nth_largest = groups.kthvalue(m - n + 1, dim=-1, keepdim=True).values
    above = groups > nth_largest
    tied = groups == nth_largest
    room_for_ties = n - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=-1) <= room_for_ties))
    return keep.reshape(scores.shape)


def apply_pattern(x: torch.Tensor, scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Zero all but the kept entries of ``x`` (``(..., in)``) by ``scores`` under ``pattern``.

    For N:M the input width is split into groups of M from the start; a tail shorter than M (only
    present when the caller allowed it) stays dense.
    """
    width = x.shape[-1]
    n, m = pattern.keep_count(width)
    if n >= m:
        return x
    body = width - width % m
    kept = x[..., :body].where(nm_keep_mask(scores[..., :body], n, m), 0)
    if body == width:
        return kept
    return torch.cat([kept, x[..., body:]], dim=-1)
