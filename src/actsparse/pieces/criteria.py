"""Selection criteria: the score by which the top N of each M activations are kept.

Every criterion scores element ``x_ij`` (token i, input channel j) as ``|x_ij|`` times a
per-channel factor. Weight-derived factors are computed once, when a layer is attached.
"""

from __future__ import annotations

import torch

from actsparse.pieces.base import CRITERIA, Criterion

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
