import pytest
import torch

from actsparse import kernels, parse_pattern
from actsparse.core.ops import apply_pattern, nm_keep_mask

PATTERNS = ["1:4", "2:4", "4:8", "8:16", "16:32", "3:5"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_exactly_n_kept_per_group_and_they_are_the_top_n(pattern):
    p = parse_pattern(pattern)
    scores = torch.randn(7, 3, p.m * 4).abs()
    mask = nm_keep_mask(scores, p.n, p.m)
    groups, kept = scores.reshape(-1, p.m), mask.reshape(-1, p.m)
    assert (kept.sum(-1) == p.n).all()
    top = groups.topk(p.n, dim=-1).values
    assert torch.equal(groups.where(kept, float("inf")).min(-1).values, top[:, -1])


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]


def test_n_equal_m_is_the_identity():
    x = torch.randn(5, 32)
    assert apply_pattern(x, x.abs(), parse_pattern("16:16")) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_float_dtype(dtype):
    x = torch.randn(4, 64).to(dtype)
    sparse = apply_pattern(x, x.abs(), parse_pattern("8:16"))
    assert sparse.dtype == dtype
    assert ((sparse != 0).reshape(-1, 16).sum(-1) == 8).all()
    assert torch.equal(sparse[sparse != 0], x[sparse != 0])


def test_a_tail_shorter_than_m_stays_dense():
    x = torch.randn(3, 20) + 10  # no zeros
    sparse = apply_pattern(x, x.abs(), parse_pattern("2:8"))
    assert torch.equal(sparse[:, 16:], x[:, 16:])
    assert ((sparse[:, :16] != 0).reshape(-1, 8).sum(-1) == 2).all()


def test_unstructured_keeps_the_top_share_of_each_row():
    x = torch.randn(6, 40)
    sparse = apply_pattern(x, x.abs(), parse_pattern("unstructured:0.25"))
    assert ((sparse != 0).sum(-1) == 10).all()
    assert torch.equal((sparse != 0), x.abs() >= x.abs().topk(10, dim=-1).values[:, -1:])


@pytest.mark.skipif(not kernels.AVAILABLE, reason="compiled selection pass not built")
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "8:16", "16:32", "3:5", "8:64"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 192), (5, 200)])
@pytest.mark.parametrize("with_factor", [False, True])
def test_compiled_pass_keeps_the_same_entries_as_pytorch(pattern, shape, with_factor):
    p = parse_pattern(pattern)
    x = torch.randn(*shape)
    x[..., ::5] = x[..., 1::5][..., : x[..., ::5].shape[-1]]  # plant ties
    factor = torch.rand(shape[-1]) + 0.5 if with_factor else None
    scores = x.abs() * factor if with_factor else x.abs()
    sparse, kept, has_nan = kernels.nm_select(x, factor, p.n, p.m)
    assert torch.equal(sparse, apply_pattern(x, scores, p))
    assert kept == int(torch.count_nonzero(sparse)) and not has_nan


@pytest.mark.skipif(not kernels.AVAILABLE, reason="compiled selection pass not built")
def test_compiled_pass_reports_nan():
    x = torch.randn(4, 32)
    x[2, 5] = float("nan")
    assert kernels.nm_select(x, None, 8, 16)[2]
