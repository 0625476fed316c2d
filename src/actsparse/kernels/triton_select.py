"""N:M selection on GPUs in one fused Triton pass: score, rank within each group of M, zero the
dropped inputs. It keeps exactly the entries of the PyTorch path (``actsparse.core.ops.apply_pattern``):
scores rounded to the dtype PyTorch computes them in, the N highest of each group kept, equal
scores going to the lower index.

Triton is imported on first use: CUDA builds of PyTorch bring it, and ``TRITON_INTERPRET=1`` runs
the same kernel on the CPU (how the tests check it).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch

SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache  # asked on every sparsified call on CUDA; the answer does not change
def available() -> bool:
    """True when Triton is installed (it compiles for the GPU, or interprets with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def supports(x: torch.Tensor, m: int) -> bool:
    """True when the fused pass runs for ``x``: a CUDA tensor of a float dtype, M a power of two up
    to 64, no gradient wanted, and Triton present."""
    return (
        x.is_cuda
        and x.dtype in SCORE_DTYPES
        and 2 <= m <= 64
        and m & (m - 1) == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
        and available()
    )


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def nm_select_kernel(
        x_ptr, factor_ptr, scores_ptr, out_ptr, groups_per_row, width, n,
        M: tl.constexpr, ROWS: tl.constexpr, HAS_FACTOR: tl.constexpr, HAS_SCORES: tl.constexpr,
        SCORE_ROUNDING: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        group = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        lane = tl.arange(0, M)
        column = group[:, None] * M + lane[None, :]
        inside = (group < groups_per_row)[:, None] & (lane < M)[None, :]
        x = tl.load(x_ptr + row * width + column, mask=inside, other=0.0)
        if HAS_SCORES:
            score = tl.load(scores_ptr + row * width + column, mask=inside, other=0.0).to(tl.float32)
        else:
            score = tl.abs(x.to(tl.float32))
            if HAS_FACTOR:
                factor = tl.load(factor_ptr + column, mask=inside, other=0.0).to(tl.float32)
                score = score * factor  # exact in float32 for 16-bit operands, then rounded below
                if SCORE_ROUNDING == 1:  # to bfloat16, nearest even, on the bits as PyTorch
                    bits = score.to(tl.uint32, bitcast=True)  # does (the interpreter's cast truncates)
                    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                    score = bits.to(tl.float32, bitcast=True)
                elif SCORE_ROUNDING == 2:
                    score = score.to(tl.float16).to(tl.float32)
        # rank = inputs of the group scored higher, plus those scored equal at a lower index
        mine = score[:, :, None]
        other = score[:, None, :]
        before = (lane[None, None, :] < lane[None, :, None]).to(tl.int32)
        ahead = (other > mine).to(tl.int32) + (other == mine).to(tl.int32) * before
        rank = tl.sum(ahead, axis=2)
        kept = tl.where(rank < n, x, tl.zeros_like(x))
        tl.store(out_ptr + row * width + column, kept, mask=inside)

    return nm_select_kernel


def _rounding(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def nm_select(
    x: torch.Tensor,
    n: int,
    m: int,
    factor: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` (``(..., in)``) with all but the ``n`` highest scores of each ``m`` consecutive inputs
    set to zero; a tail of fewer than ``m`` inputs stays dense. The scores are ``scores`` when
    given (criteria that look at the whole call), else ``|x| · factor`` rounded to
    ``torch.result_type(x, factor)`` (``|x|`` without a factor). NaN is not checked here."""
    width = x.shape[-1]
    body = width - width % m
    rows = x.reshape(-1, width).contiguous()
    out = torch.empty_like(rows)
    if body < width:
        out[:, body:] = rows[:, body:]
    if scores is not None:
        scores = scores.reshape(-1, width).contiguous()
    rounding = 0 if factor is None else _rounding(torch.result_type(x, factor))
    factor = None if factor is None else factor.contiguous()
    groups = body // m
    if groups and len(rows):
        per_program = max(1, 2048 // (m * m))  # groups ranked at once: a (groups, M, M) comparison
        grid = (len(rows), -(-groups // per_program))
        _kernel()[grid](
            rows, factor if factor is not None else rows, scores if scores is not None else rows, out,
            groups, width, n,
            M=m, ROWS=per_program, HAS_FACTOR=factor is not None, HAS_SCORES=scores is not None,
            SCORE_ROUNDING=rounding,
        )  # fmt: skip
    return out.reshape(x.shape)
