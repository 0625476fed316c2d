"""W8A8 simulated in floating point: symmetric int8 weights per output channel and
int8 activations per token, dynamic; values lie exactly on the int8 grid of their scale. Plus the
SmoothQuant scale and Outstanding-sparse's inverse of it."""

from __future__ import annotations

import torch

_TINY = 1e-8
INT8_MAX = 127


def fake_quantize(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Round ``t`` to a symmetric int8 grid with one scale per slice along ``dim`` (max |t| ↦ 127)."""
    scale = t.abs().amax(dim=dim, keepdim=True).float().clamp_min(_TINY) / INT8_MAX
    return ((t.float() / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale).to(t.dtype)


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """int8 per output channel (one scale per row of ``(out, in)``)."""
    return fake_quantize(weight, dim=1)


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """int8 per token (one scale per row of ``(..., in)``), computed on the fly."""
    return fake_quantize(x, dim=-1)


def smoothing_scale(input_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_:,j|^α / max|W_:,j|^(1−α)``: activations are divided by it and
    weight columns multiplied, which leaves ``X Wᵀ`` unchanged."""
    weight_max = weight.detach().abs().amax(dim=0).float().clamp_min(_TINY)
    return input_max.float().clamp_min(_TINY).pow(alpha) / weight_max.pow(1 - alpha)
