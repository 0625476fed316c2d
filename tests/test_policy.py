import itertools
import math

import pytest
import torch
from torch import nn

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.calibration.sensitivity import layer_sensitivity
from actsparse.pieces.policies import AmberRule, OutputKl, amber_layers, budget_layers, least_cost_by_share


def test_sensitivity_is_the_relative_output_error_by_hand():
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(4, 2, bias=False))
    model.up_proj.weight.data = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0]])
    windows = torch.tensor([[[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]]])  # one window of two tokens
    config = SparsityConfig(pattern="2:4", criterion="magnitude", include=("up_proj",))
    # keep -2 and 3: Y = [1-4+1.5+12, -2+3] = [10.5, 1]; Y' = [-4+12, -2+3] = [8, 1]
    expected = math.sqrt(2.5**2) / math.sqrt(10.5**2 + 1)
    sensitivity = layer_sensitivity(_Forward(model), windows, {"up_proj": model.up_proj}, config)
    assert sensitivity["up_proj"] == pytest.approx(expected, rel=1e-6)


class _Forward(nn.Module):
    """Lets a Sequential take the (1, tokens, in) windows the observers feed models."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, use_cache=False):
        return self.inner(x)


def test_budget_policy_reaches_its_target_with_the_least_sensitivity():
    sensitivity = {"a": 0.9, "b": 0.1, "c": 0.2, "d": 0.5, "e": 0.05}
    flops = {"a": 40, "b": 10, "c": 30, "d": 20, "e": 10}
    total = 110 + 10  # 10 FLOPs of layers that are no candidates
    chosen = budget_layers(sensitivity, flops, total, share=0.4)
    assert sum(flops[n] for n in chosen) >= 0.4 * total
    best = min(
        (
            set(s)
            for r in range(1, 6)
            for s in itertools.combinations(sensitivity, r)
            if sum(flops[n] for n in s) >= 48
        ),
        key=lambda s: sum(sensitivity[n] for n in s),
    )
    assert set(chosen) == best == {"b", "c", "e"}


def test_budget_policy_refuses_an_unreachable_share():
    with pytest.raises(ActsparseError, match="cover only 50.0% of linear FLOPs"):
        budget_layers({"a": 0.1}, {"a": 50}, 100, share=0.6)


def test_amber_policy_follows_the_published_rule():
    names = [
        f"layers.{i}.{kind}"
        for i in range(4)
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ]
    sensitivity = {n: float(i) for i, n in enumerate(names)}  # later layers are more sensitive
    flops = dict.fromkeys(names, 1)
    chosen = amber_layers(sensitivity, flops, total_flops=len(names), share=0.0, skip=1)
    kinds = {n.rsplit(".", 1)[1] for n in chosen}
    assert kinds == {"q_proj", "gate_proj", "down_proj"}
    assert "layers.3.q_proj" not in chosen and "layers.3.gate_proj" not in chosen  # the most sensitive
    assert all(f"layers.{i}.down_proj" in chosen for i in range(4))
    assert len(chosen) == 4 + 3 + 3


def test_amber_policy_stops_skipping_at_the_flop_share():
    names = [f"layers.{i}.{kind}" for i in range(4) for kind in ("q_proj", "gate_proj", "down_proj")]
    chosen = amber_layers({n: 1.0 for n in names}, dict.fromkeys(names, 1), 12, share=11 / 12, skip=5)
    assert len(chosen) == 11


def test_policies_attach_through_sparsify(llama, tokens):
    handle = sparsify(
        llama, SparsityConfig(pattern="2:4", policy=AmberRule(flop_share=0.3, amber_skip=1)), tokens
    )
    sparse = {n for n, layer in handle.layers.items() if layer.sparse}
    assert sparse and all(n.endswith(("q_proj", "gate_proj", "down_proj")) for n in sparse)
    assert handle.describe()["skipped_layers"]
    assert set(handle.describe()["sensitivity"]) == set(handle.originals) | set(
        handle.describe()["skipped_layers"]
    )


def test_policies_need_calibration(llama):
    with pytest.raises(ActsparseError, match="needs calibration text"):
        sparsify(llama, SparsityConfig(policy="budget"))


def test_least_cost_by_share_sums_the_costs_of_the_layers_budget_chooses():
    costs = {"a": 0.5, "b": 0.1, "c": 0.2, "d": 0.05}
    flops = {"a": 40, "b": 20, "c": 20, "d": 10}
    rows = least_cost_by_share(costs, flops, 100, [0.1, 0.3, 0.5, 0.9, 1.0])
    assert [row["flop_share"] for row in rows] == [0.1, 0.3, 0.5, 0.9]  # 1.0 is out of reach
    for row in rows:
        chosen = budget_layers(costs, flops, 100, row["flop_share"])
        assert row["layers"] == len(chosen) and row["summed_cost"] == pytest.approx(
            sum(costs[n] for n in chosen)
        )
        assert row["sparse_flop_share"] >= row["flop_share"]
    assert [row["summed_cost"] for row in rows] == pytest.approx([0.1, 0.15, 0.35, 0.85])


def test_output_kl_is_the_kl_that_evaluation_reports_for_the_layer_alone(llama):
    import re

    from actsparse.calibration.sensitivity import layer_output_kl
    from actsparse.eval.evaluate import evaluate
    from actsparse.sparse.targets import target_layers

    windows = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(7))
    config = SparsityConfig(pattern="2:4", criterion="amber")
    layers = target_layers(llama, config)
    kl = layer_output_kl(llama, windows, layers, config, count=2, batch_size=2)
    assert set(kl) == set(layers) and all(value > 0 for value in kl.values())
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        alone = SparsityConfig(pattern="2:4", criterion="amber", include=(re.escape(name) + "$",))
        row = evaluate(llama, windows[:2], [alone], progress=False)[1]
        assert kl[name] == pytest.approx(row.kl_to_dense, rel=1e-4)


def test_kl_policy_keeps_the_share_sparse_with_the_layers_of_least_output_kl(llama):
    from actsparse.calibration.sensitivity import layer_output_kl
    from actsparse.eval.flops import flop_report
    from actsparse.sparse.targets import linear_flops, linear_layers, target_layers

    calibration = torch.randint(0, 128, (6, 20), generator=torch.Generator().manual_seed(8))
    config = SparsityConfig(pattern="2:4", policy=OutputKl(flop_share=0.5, kl_windows=3))
    with sparsify(llama, config, calibration) as handle:
        described = handle.describe()
        share = flop_report(llama, handle).sparse_share
    candidates = target_layers(llama, config)
    kl = layer_output_kl(llama, calibration, candidates, config, count=3)
    assert described["sensitivity"] == pytest.approx(kl)  # measured on the first kl_windows windows
    flops = {name: linear_flops(layer) for name, layer in candidates.items()}
    total = sum(linear_flops(layer) for layer in linear_layers(llama).values())
    chosen = set(kl) - set(described["skipped_layers"])
    assert chosen == set(budget_layers(kl, flops, total, 0.5)) and 0.5 <= share < 1


def test_kl_policy_measurement_is_kept_for_later_runs_with_the_same_model_and_measured_windows(
    llama, measurements_store
):
    calibration = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(8))
    config = SparsityConfig(pattern="2:4", policy=OutputKl(flop_share=0.5, kl_windows=2))
    calls = []
    hook = llama.register_forward_pre_hook(lambda *_: calls.append(1))

    def described(windows: torch.Tensor) -> dict:
        with sparsify(llama, config, windows) as handle:
            return handle.describe()

    first = described(calibration)
    measured = len(calls)
    assert measured > 0 and len(list(measurements_store.glob("*.json"))) == 1
    assert described(calibration) == first and len(calls) == measured  # read back: no forward pass
    assert described(calibration[:2]) == first and len(calls) == measured  # only kl_windows=2 are read
    described(calibration.flip(0))  # other windows: measured anew
    assert len(calls) > measured and len(list(measurements_store.glob("*.json"))) == 2
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0  # other weights: measured anew
    count = len(calls)
    described(calibration)
    assert len(calls) > count and len(list(measurements_store.glob("*.json"))) == 3
    hook.remove()


def test_rest_pattern_gives_the_layers_the_policy_leaves_out_the_denser_pattern(llama, tokens):
    import re

    from actsparse.eval.flops import flop_report
    from actsparse.sparse.targets import linear_flops

    calibration = torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(8))
    policy = OutputKl(flop_share=0.3, kl_windows=2)
    alone = sparsify(llama, SparsityConfig(pattern="2:4", policy=policy), calibration)
    chosen = set(alone.policy_layers)
    alone.remove()
    mixed = SparsityConfig(pattern="2:4", policy=policy, rest_pattern="3:4")
    with sparsify(llama, mixed, calibration) as handle:
        assert set(handle.policy_layers) == chosen  # the same ranking and choice as without it
        rest = set(handle.layers) - chosen
        assert rest and {str(handle.layers[n].pattern) for n in rest} == {"3:4"}
        assert set(handle.describe()["skipped_layers"]) == rest
        report = flop_report(llama, handle)
        with torch.no_grad():
            logits = llama(tokens, use_cache=False).logits
    removed = sum(
        linear_flops(layer) * (0.5 if name in chosen else 0.25) for name, layer in handle.originals.items()
    )
    assert report.sparse_share == 1 and report.removed_share == pytest.approx(
        removed / report.linear_flops_per_token
    )

    def only(names):  # a layer filter matching exactly ``names``
        return tuple(f"^{re.escape(name)}$" for name in names)

    # the same as two handles on disjoint layers, one per pattern, made one at a time and attached together
    by_hand = []
    for pattern, names in (("2:4", chosen), ("3:4", rest)):
        by_hand.append(sparsify(llama, SparsityConfig(pattern=pattern, include=only(names))))
        by_hand[-1].remove()
    for handle in by_hand:
        handle.attach()
    with torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, logits)
    for handle in by_hand:
        handle.remove()


def test_rest_pattern_needs_a_policy_that_leaves_layers_out():
    with pytest.raises(ActsparseError, match="policy=all leaves none"):
        SparsityConfig(pattern="8:16", rest_pattern="12:16")
    with pytest.raises(ActsparseError, match="cpu-kernel backend takes M up to 64"):
        SparsityConfig(pattern="8:16", policy="kl", rest_pattern="96:128", backend="cpu-kernel")
    with pytest.raises(ActsparseError, match="permute correction"):
        SparsityConfig(pattern="8:16", policy="kl", rest_pattern="unstructured:0.7", corrections="permute")
    config = SparsityConfig(pattern="8:16", policy="kl", rest_pattern=" 12 : 16 ")
    assert config.rest_pattern == "12:16" and "rest=12:16" in config.label
    assert SparsityConfig.from_dict(config.to_dict()) == config
    assert "rest_pattern" not in SparsityConfig(policy="kl").to_dict()  # older keys stay as they were
