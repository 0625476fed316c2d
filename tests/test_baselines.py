import pytest
import torch

from actsparse import ActsparseError
from actsparse.eval.baselines import WeightPruningConfig, prune_weights, sparsegpt_prune, wanda_mask
from actsparse.eval.flops import flop_report


def test_wanda_matches_a_hand_example():
    weight = torch.tensor([[4.0, -1.0, 2.0, 3.0], [1.0, 1.0, -1.0, 1.0]])
    input_norm = torch.tensor([0.1, 10.0, 1.0, 1.0])
    # scores row 0: 0.4, 10, 2, 3 -> keep columns 1 and 3; row 1: 0.1, 10, 1, 1 -> keep 1 and 2 (tie: lower index)
    assert wanda_mask(weight, input_norm, 2, 4).tolist() == [
        [False, True, False, True],
        [False, True, True, False],
    ]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "8:16"])
def test_exactly_n_of_m_weights_remain_per_group(llama, tokens, method, pattern):
    dense = {n: p.clone() for n, p in llama.named_parameters()}
    handle = prune_weights(llama, WeightPruningConfig(method=method, pattern=pattern), tokens)
    n, m = map(int, pattern.split(":"))
    for name in handle.layers:
        weight = llama.get_submodule(name).weight
        assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all()
        assert (weight != 0).sum() >= 0.99 * n / m * weight.numel()  # exact zeros are vanishingly rare
    report = flop_report(llama, handle)
    assert report.sparse_share == 1 and report.measured_density == pytest.approx(n / m, abs=0.01)
    handle.remove()
    assert all(torch.equal(p, dense[n]) for n, p in llama.named_parameters())


def test_sparsegpt_beats_magnitude_on_the_layer_output():
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: where the Hessian matters
    weight = torch.randn(32, 64)
    hessian = 2 * x.T @ x / x.shape[0]
    pruned = sparsegpt_prune(weight, hessian, 2, 4)
    magnitude = weight * wanda_mask(weight, torch.ones(64), 2, 4)
    assert ((pruned != 0).reshape(32, -1, 4).sum(-1) <= 2).all()
    wanda = weight * wanda_mask(weight, x.norm(dim=0), 2, 4)

    def error(w):
        return (x @ (w - weight).T).norm()

    assert error(pruned) < 0.85 * min(error(magnitude), error(wanda))
    assert torch.allclose(sparsegpt_prune(weight, hessian, 4, 4), weight, atol=1e-4)  # N = M changes nothing


def test_calibrated_methods_need_calibration(llama):
    with pytest.raises(ActsparseError, match="wanda statistics needs calibration text"):
        prune_weights(llama, WeightPruningConfig(method="wanda"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "obs"}, "Unknown weight-pruning method 'obs'"),
        ({"pattern": "unstructured:0.5"}, "takes an N:M pattern"),
        ({"pattern": "2:24"}, "blocksize 128 is not a multiple of M=24"),
    ],
)
def test_bad_weight_pruning_settings(kwargs, message):
    with pytest.raises(ActsparseError, match=message):
        WeightPruningConfig(**kwargs)


def test_a_registered_pruning_method_runs_by_name(llama, tokens):
    from actsparse.eval.baselines import WEIGHT_PRUNING, PruningMethod

    class FirstOfEachGroup(PruningMethod):
        name = "toy-first"
        needs_calibration = False

        def prune(self, weight, statistics, pattern, config):
            mask = torch.zeros(pattern.m, dtype=torch.bool)
            mask[: pattern.n] = True
            return weight * mask.repeat(weight.shape[1] // pattern.m)

    WEIGHT_PRUNING.register(FirstOfEachGroup())
    try:
        with prune_weights(llama, WeightPruningConfig(method="toy-first", pattern="2:4")) as handle:
            weight = handle.layers["model.layers.0.mlp.up_proj"].pruned
            assert torch.count_nonzero(weight[:, 2::4]) == 0 and torch.count_nonzero(weight[:, 0::4]) > 0
    finally:
        WEIGHT_PRUNING.unregister("toy-first")
    with pytest.raises(
        ActsparseError, match="Unknown weight-pruning method 'toy-first'; choose one of magnitude"
    ):
        WeightPruningConfig(method="toy-first")
