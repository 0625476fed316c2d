"""Selection criteria: the score by which the top N of each M activations are kept.

Every criterion scores element ``x_ij`` (token i, input channel j) as ``|x_ij|`` times a
per-channel factor. Weight-derived factors are computed once, when a layer is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from actsparse.core.registry import Registry

_TINY = 1e-12


def robust_column_norms(weight: torch.Tensor, clip: float = 0.005) -> torch.Tensor:
    """Amber Pruner's robust norm ``f(Ŵ)_j = ‖Ŵ_:,j‖₂ / min_k ‖Ŵ_:,k‖₂``.

    ``Ŵ`` is ``weight`` clipped to its ``clip`` and ``1 - clip`` quantiles (nearest rank, so any
    tensor size works), then standardised over the whole tensor.
    """
    w = weight.detach().float()
    flat = w.flatten()
    last = flat.numel() - 1
    low = flat.kthvalue(round(clip * last) + 1).values
    high = flat.kthvalue(round((1 - clip) * last) + 1).values
    clipped = w.clamp(low, high)
    standardised = (clipped - clipped.mean()) / clipped.std().clamp_min(_TINY)
    norms = standardised.norm(dim=0)
    return norms / norms.min().clamp_min(_TINY)


@dataclass(frozen=True)
class Criterion:
    """A named score. ``weight_factor`` maps a layer's weight ``(out, in)`` to a per-input-channel
    factor (or None); ``uses_batch`` marks scores that also depend on the other tokens of the call."""

    name: str
    description: str
    weight_factor: Callable[[torch.Tensor], torch.Tensor] | None = None
    uses_batch: bool = False

    def channel_factor(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor | None:
        """Per-input-channel multiplier of ``|x|`` for this call: the layer's static factor, times
        for CLACT the column norm of ``x`` over the call's tokens."""
        if self.uses_batch:
            norms = x.reshape(-1, x.shape[-1]).float().norm(dim=0).to(x.dtype)
            return norms if weight_factor is None else norms * weight_factor
        return weight_factor

    def score(self, x: torch.Tensor, weight_factor: torch.Tensor | None) -> torch.Tensor:
        """Score every element of ``x`` (``(..., in)``); higher is kept first.

        CLACT's division by the token's row norm is applied here as published; it scales a whole
        row, so it never changes which entries of a row are kept.
        """
        factor = self.channel_factor(x, weight_factor)
        score = x.abs() if factor is None else x.abs() * factor
        if self.uses_batch:
            score = score / x.float().norm(dim=-1, keepdim=True).clamp_min(_TINY).to(x.dtype)
        return score


CRITERIA: Registry[Criterion] = Registry("criterion")
"""The selection criteria by name; add one with ``CRITERIA.register(Criterion(...))``."""

for _criterion in (
    Criterion("magnitude", "|x|"),
    Criterion("wina", "|x| · ‖W_:,j‖₂", weight_factor=lambda w: w.detach().float().norm(dim=0)),
    Criterion("amber", "|x| · robust column norm of W (Amber Pruner)", weight_factor=robust_column_norms),
    Criterion("clact", "|x| · ‖X_:,j‖₂ / ‖X_i,:‖₂ over the call's tokens", uses_batch=True),
    Criterion(
        "variance",
        "|x| · Var(W_:,j) over output rows",
        weight_factor=lambda w: w.detach().float().var(dim=0, correction=0),
    ),
):
    CRITERIA.register(_criterion)

get_criterion = CRITERIA.get
"""Look a criterion up by name; an unknown name is refused with the list of known ones."""
