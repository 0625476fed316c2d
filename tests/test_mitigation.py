import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.core.ops import apply_pattern
from actsparse.pieces.corrections import Shift, balanced_groups
from actsparse.sparse.layer import SparseLinear


def layer(config: SparsityConfig, weight: torch.Tensor, bias: torch.Tensor | None = None) -> SparseLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias
    return SparseLinear(linear, "up_proj", config)


def test_shift_by_hand():
    # median of [1, 2, 3, 10] is 2 (the lower middle value); x − η = [-1, 0, 1, 8]; 2:4 keeps 8 and
    # -1 (a tie with 1, lower index first); + η gives [1, 2, 2, 10]
    sparse = layer(SparsityConfig(pattern="2:4", criterion="magnitude", corrections="shift"), torch.eye(4))
    x = torch.tensor([[[1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 10.0]]])
    torch.testing.assert_close(sparse(x)[0, 0], torch.tensor([1.0, 2.0, 2.0, 10.0]))


@pytest.mark.parametrize("statistic", ["median", "mean"])
def test_shift_adds_eta_times_row_sums_exactly_as_the_dense_form(statistic):
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    config = SparsityConfig(pattern="8:16", criterion="amber", corrections=(Shift(shift_statistic=statistic),))
    sparse = layer(config, weight, bias)
    x = torch.randn(2, 5, 32) + 3
    eta = x.median(-1, keepdim=True).values if statistic == "median" else x.mean(-1, keepdim=True)
    scores = sparse.criterion.score(x - eta, sparse.channel_factor)
    dense_form = apply_pattern(x - eta, scores, sparse.pattern) + eta
    torch.testing.assert_close(sparse(x), F.linear(dense_form, weight, bias))


def test_variance_restoration_by_hand():
    sparse = layer(SparsityConfig(pattern="2:4", criterion="magnitude", corrections="var"), torch.eye(4))
    x = torch.tensor([[[3.0, -1.0, 1.0, -3.0], [3.0, -1.0, 1.0, -3.0]]])
    scale = (20 / 18) ** 0.5  # Var(x) = 20/3, Var([3, 0, 0, -3]) = 18/3
    torch.testing.assert_close(sparse(x)[0, 0], torch.tensor([3.0, 0.0, 0.0, -3.0]) * scale)


def test_corrections_leave_decode_steps_dense():
    weight = torch.randn(8, 16)
    sparse = layer(SparsityConfig(pattern="2:4", corrections="shift+var"), weight)
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(sparse(x), F.linear(x, weight))


def test_shift_and_var_run_on_a_model(llama, tokens):
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    with sparsify(llama, SparsityConfig(pattern="2:4", corrections="shift+var")):
        with torch.no_grad():
            sparse = llama(tokens, use_cache=False).logits
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    assert SparsityConfig(pattern="2:4", corrections="shift+var").label == "2:4 amber shift+var"


@pytest.mark.parametrize("corrections", ["shfit", "smooth", "+"])
def test_unknown_mitigation(corrections):
    with pytest.raises(ActsparseError, match="Unknown corrections"):
        SparsityConfig(corrections=corrections)


def test_a_correction_named_twice_or_two_smoothings_are_refused():
    with pytest.raises(ActsparseError, match="name a correction twice"):
        SparsityConfig(corrections="shift+shift")
    with pytest.raises(ActsparseError, match="two smoothing corrections"):
        SparsityConfig(corrections="smoothquant+outstanding")


def learned_layer(
    weight, bias, corrections="learnable", criterion="magnitude", pattern="2:4", phase="prefill"
):
    config = SparsityConfig(pattern=pattern, criterion=criterion, corrections=corrections, phase=phase)
    return layer(config, weight, bias)


def test_learned_corrections_by_hand():
    # x = [1, -3, 1.2, 2], shift s = [0.5, 0, 0, 0] → v = [0.5, -3, 1.2, 2]; scale d = [1, 1, 2, 1]
    # makes the scores |v|·|d| = [0.5, 3, 2.4, 2], so 2:4 keeps channels 1 and 2 (without d: 1 and 3).
    # Input to W: prune(v)·d + s = [0.5, -3, 2.4, 0]; W rows [1, 1, 1, 1] and [1, 0, -1, 2], b = [0.5, -1]
    # give [0.4, -2.9]; times 1 + a = [2, 0.5] and plus output bias [0.25, 0] gives [1.05, -1.45].
    sparse = learned_layer(
        torch.tensor([[1.0, 1, 1, 1], [1, 0, -1, 2]]), torch.tensor([0.5, -1.0]), phase="all"
    )
    correction = sparse.state("learnable")
    correction.shift.data = torch.tensor([0.5, 0, 0, 0])
    correction.scale.data = torch.tensor([1.0, 1, 2, 1])
    correction.output_scale.data = torch.tensor([1.0, -0.5])
    correction.output_bias.data = torch.tensor([0.25, 0.0])
    x = torch.tensor([[1.0, -3.0, 1.2, 2.0]])
    expected = torch.tensor([[1.05, -1.45]])
    torch.testing.assert_close(sparse(x), expected)
    sparse.fold()
    torch.testing.assert_close(sparse(x), expected)


@pytest.mark.parametrize("criterion", ["magnitude", "amber", "clact"])
@pytest.mark.parametrize("corrections", ["learnable", "shift+learnable"])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_corrections_equal_the_unfolded_form(criterion, corrections, bias):
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    sparse = learned_layer(weight, torch.randn(24) if bias else None, corrections, criterion, "8:16")
    correction = sparse.state("learnable")
    for parameter, spread in zip(correction.parameters(), (0.5, 0.3, 0.2, 0.1)):
        parameter.data += spread * torch.randn_like(parameter)
    x = torch.randn(2, 7, 32)
    unfolded = sparse(x)
    sparse.fold()
    assert sparse.folded
    torch.testing.assert_close(sparse(x), unfolded, rtol=1e-5, atol=1e-5)
    decode = torch.randn(1, 1, 32)  # single-token calls stay dense, without corrections
    torch.testing.assert_close(sparse(decode), F.linear(decode, weight, sparse.bias))


def test_learned_corrections_start_as_the_plain_layer():
    torch.manual_seed(0)
    weight, bias = torch.randn(24, 32), torch.randn(24)
    plain = layer(SparsityConfig(pattern="8:16"), weight, bias)
    learned = learned_layer(weight, bias, criterion="amber", pattern="8:16")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(learned(x), plain(x))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"corrections": "var+learnable"}, r"var\+learnable are not supported"),
        ({"corrections": "learnable", "quant": "w8a8"}, "cannot be combined with quant='w8a8'"),
    ],
)
def test_unsupported_learnable_combinations(settings, message):
    with pytest.raises(ActsparseError, match=message):
        SparsityConfig(**settings)


def test_balanced_groups_deal_the_ranks_back_and_forth_across_the_groups():
    # importance ranks 10 > 0 > 1 > … > 9: width 11 in groups of 4 leaves a tail of 3, which takes
    # the three most important (10, 0, 1); the rest are dealt 2 → g0, 3 → g1, 4 → g1, 5 → g0, …
    importance = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0, 10])
    order = balanced_groups(importance, 4)
    assert order.tolist() == [2, 5, 6, 9, 3, 4, 7, 8, 10, 0, 1]
    groups = balanced_groups(torch.arange(64.0), 16).reshape(4, 16)
    ranks = 63 - groups  # every group holds one channel of each round of four ranks
    assert all(sorted((ranks // 4).tolist()[g]) == list(range(16)) for g in range(4))


def permuted(
    weight: torch.Tensor, mean_square: torch.Tensor, pattern: str = "2:4", **settings
) -> SparseLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    config = SparsityConfig(pattern=pattern, criterion="magnitude", corrections="permute", **settings)
    return SparseLinear(linear, "up_proj", config, {"input_mean_square": mean_square})


def test_permute_lets_each_group_keep_its_typically_large_inputs():
    # Channels 0–3 are typically large. In the model's order they share the first group, which
    # keeps only two of them; regrouped, each group holds two large and two small channels.
    x = torch.tensor([[[3.0, 3.1, 3.2, 3.3, 1.0, 1.1, 1.2, 1.3]] * 2])
    mean_square = torch.tensor([9.0, 9, 9, 9, 1, 1, 1, 1])
    plain = layer(SparsityConfig(pattern="2:4", criterion="magnitude"), torch.eye(8))
    torch.testing.assert_close(plain(x)[0, 0], torch.tensor([0, 0, 3.2, 3.3, 0, 0, 1.2, 1.3]))
    regrouped = permuted(torch.eye(8), mean_square)
    torch.testing.assert_close(regrouped(x)[0, 0], torch.tensor([3.0, 3.1, 3.2, 3.3, 0, 0, 0, 0]))


def test_permute_leaves_every_product_of_the_layer_as_it_was():
    torch.manual_seed(0)
    weight = torch.randn(24, 32)
    regrouped = permuted(weight, torch.rand(32), "8:16", phase="all")
    x = torch.randn(2, 5, 32)
    kept = regrouped.sparsify_input(x[..., regrouped.state("permute").value], regrouped.channel_factor)
    assert (kept != 0).sum() == x.numel() // 2  # 8 of 16 in every regrouped group
    torch.testing.assert_close(regrouped(x), F.linear(kept, regrouped.weight))
    unpermuted = torch.zeros_like(x).index_copy(-1, regrouped.state("permute").value, kept)
    torch.testing.assert_close(regrouped(x), F.linear(unpermuted, weight))  # the model's own order


def test_permute_puts_the_most_important_inputs_in_the_dense_tail():
    mean_square = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 1, 5])
    regrouped = permuted(torch.eye(10), mean_square, remainder="dense")
    assert regrouped.state("permute").value[-2:].tolist() == [9, 0]


def test_permute_is_refused_without_groups():
    with pytest.raises(ActsparseError, match="unstructured sparsity has none"):
        SparsityConfig(pattern="unstructured:0.5", corrections="permute")


def test_the_old_name_mitigation_is_still_accepted_wherever_users_give_it(tmp_path):
    from actsparse.config import configs_from_settings
    from actsparse.eval.sweep import read_sweep_file
    from actsparse.eval.variants import parse_variant

    expected = SparsityConfig(pattern="2:4", corrections="shift+var")
    assert SparsityConfig(pattern="2:4", mitigation="shift+var") == expected
    assert configs_from_settings({"pattern": "2:4", "mitigation": "shift+var"}) == [expected]
    assert parse_variant("pattern=2:4 mitigation=shift+var") == [expected]
    stored = expected.to_dict()
    stored["mitigation"] = stored.pop("corrections")  # as recipes and results of formats 2 and 3 hold it
    assert SparsityConfig.from_dict(stored) == expected
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("mitigation: shift+var\n")
    assert read_sweep_file(sweep) == {"corrections": "shift+var"}
    with pytest.raises(ActsparseError, match="mitigation is the old name of corrections and both are given"):
        SparsityConfig(corrections="shift", mitigation="var")
    with pytest.raises(ActsparseError, match="mitigation is the old name of corrections and both are given"):
        configs_from_settings({"corrections": "shift", "mitigation": "var"})
