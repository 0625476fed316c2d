"""Error mitigation of N:M activation sparsity (REFERENCE §3).

Training-free corrections work on each token alone: ``shift_value`` (η of ``prune(x − η) + η``) and
``variance_restored``. ``LearnedCorrection`` holds the calibrated per-channel corrections of one
layer and folds them into its weight and bias once calibration is over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def shift_value(x: torch.Tensor, statistic: str) -> torch.Tensor:
    """η of the shift correction: each token's median (or mean) input, ``(..., 1)``."""
    if statistic == "mean":
        return x.mean(dim=-1, keepdim=True)
    return x.median(dim=-1, keepdim=True).values


def variance_restored(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """``sparse`` scaled per token by ``sqrt(Var(dense) / Var(sparse))`` (rows of zeros kept)."""
    ratio = dense.float().var(dim=-1, keepdim=True) / sparse.float().var(dim=-1, keepdim=True)
    return sparse * torch.nan_to_num(ratio, nan=1.0, posinf=1.0).sqrt().to(sparse.dtype)


@dataclass(frozen=True)
class FoldedLayer:
    """What a sparsified call multiplies with once the learned corrections are folded in."""

    weight: torch.Tensor
    bias: torch.Tensor
    row_sum: torch.Tensor
    channel_factor: torch.Tensor


class LearnedCorrection(nn.Module):
    """Calibrated corrections of one layer, all per channel; at initialisation they do nothing.

    With ``v = x − shift`` (and, under the training-free shift, ``v − η``) a sparsified call computes::

        y = ((prune(v) ⊙ scale + shift + η) Wᵀ + b) ⊙ (1 + output_scale) + output_bias

    i.e. the dropped inputs are replaced by ``shift`` (learnable shift), the kept ones are scaled
    per channel (learnable diagonal scale, which also multiplies the selection score), and the
    output is corrected per channel (``Y(1 + a) + b``). ``fold`` turns all of it into one weight,
    bias and channel factor, so inference only subtracts ``shift`` before the usual selection.
    """

    TENSORS = ("scale", "shift", "output_scale", "output_bias")

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        # Trainable only while calibration fits them (``actsparse.calibrate``).
        self.scale = nn.Parameter(torch.ones(in_features, dtype=dtype), requires_grad=False)
        self.shift = nn.Parameter(torch.zeros(in_features, dtype=dtype), requires_grad=False)
        self.output_scale = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)
        self.output_bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False)

    def selection_factor(self, factor: torch.Tensor | None) -> torch.Tensor:
        """The criterion's per-channel factor times ``|scale|``: selection sees the scaled input."""
        magnitude = self.scale.detach().abs()
        return magnitude if factor is None else factor * magnitude

    def unfolded(
        self,
        sparse: torch.Tensor,
        shift_eta: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The output of a sparsified call from the pruned ``v`` (differentiable; for calibration)."""
        fill = self.shift if shift_eta is None else self.shift + shift_eta
        y = F.linear(sparse * self.scale + fill, weight, bias)
        return y * (1 + self.output_scale) + self.output_bias

    @torch.no_grad()
    def fold(
        self, weight: torch.Tensor, bias: torch.Tensor | None, channel_factor: torch.Tensor | None
    ) -> FoldedLayer:
        """One weight ``diag(1 + a) W diag(scale)``, bias ``(1 + a)(b + W·shift) + output_bias``, the
        row sums ``(1 + a) W.sum(1)`` for the per-token η, and the selection factor."""
        gain = 1 + self.output_scale
        base_bias = weight @ self.shift if bias is None else bias + weight @ self.shift
        return FoldedLayer(
            weight=(gain[:, None] * weight * self.scale).contiguous(),
            bias=gain * base_bias + self.output_bias,
            row_sum=gain * weight.sum(dim=1),
            channel_factor=self.selection_factor(channel_factor).contiguous(),
        )
