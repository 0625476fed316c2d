import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.layers import SparseLinear
from actsparse.ops import apply_pattern


def layer(config: SparsityConfig, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias
    return SparseLinear(linear, "up_proj", config)


def test_shift_by_hand():
    # median of [1, 2, 3, 10] is 2 (the lower middle value); x − η = [-1, 0, 1, 8]; 2:4 keeps 8 and
    # -1 (a tie with 1, lower index first); + η gives [1, 2, 2, 10]
    sparse = layer(SparsityConfig(pattern="2:4", criterion="magnitude", mitigation="shift"), torch.eye(4))
    x = torch.tensor([[[1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 10.0]]])
    torch.testing.assert_close(sparse(x)[0, 0], torch.tensor([1.0, 2.0, 2.0, 10.0]))


@pytest.mark.parametrize("statistic", ["median", "mean"])
def test_shift_adds_eta_times_row_sums_exactly_as_the_dense_form(statistic):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    config = SparsityConfig(pattern="8:16", criterion="amber", mitigation="shift", shift_statistic=statistic)
    sparse = layer(config, weight, bias)
    x = torch.randn(2, 5, 32) + 3
    eta = x.median(-1, keepdim=True).values if statistic == "median" else x.mean(-1, keepdim=True)
    scores = sparse.criterion.score(x - eta, sparse.channel_factor)
    dense_form = apply_pattern(x - eta, scores, sparse.pattern) + eta
    torch.testing.assert_close(sparse(x), F.linear(dense_form, weight, bias))


def test_variance_restoration_by_hand():
    sparse = layer(SparsityConfig(pattern="2:4", criterion="magnitude", mitigation="var"), torch.eye(4))
    x = torch.tensor([[[3.0, -1.0, 1.0, -3.0], [3.0, -1.0, 1.0, -3.0]]])
    scale = (20 / 18) ** 0.5  # Var(x) = 20/3, Var([3, 0, 0, -3]) = 18/3
    torch.testing.assert_close(sparse(x)[0, 0], torch.tensor([3.0, 0.0, 0.0, -3.0]) * scale)


def test_corrections_leave_decode_steps_dense():
    weight = torch.randn(8, 16)
    sparse = layer(SparsityConfig(pattern="2:4", mitigation="shift+var"), weight)
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(sparse(x), F.linear(x, weight))


def test_shift_and_var_run_on_a_model(llama, tokens):
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    with sparsify(llama, SparsityConfig(pattern="2:4", mitigation="shift+var")):
        with torch.no_grad():
            sparse = llama(tokens, use_cache=False).logits
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    assert SparsityConfig(pattern="2:4", mitigation="shift+var").label == "2:4 amber shift+var"


@pytest.mark.parametrize("mitigation", ["shfit", "smooth", "+"])
def test_unknown_mitigation(mitigation):
    with pytest.raises(ActsparseError, match="Unknown mitigation"):
        SparsityConfig(mitigation=mitigation)
