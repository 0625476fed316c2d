"""Calibration of the learned corrections (block by block, and end to end), on a tiny random Llama."""

import pytest
import torch

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.calibration.fitting import decoder_blocks, settings_for
from actsparse.config import CalibrationSettings
from actsparse.pieces.corrections import LEARNABLE_PARTS, Learnable, Shift

CONFIG = SparsityConfig(
    pattern="2:4", criterion="amber", corrections=(Shift(), Learnable(objective="block-mse"))
)


# Random tokens on a random model: a fit does not carry over to a held-out window of other random
# tokens in a few steps, so the tests of the fit itself judge it on the windows fitted (holdout=0);
# the held-out judgement has its own tests below.


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


def test_calibration_fits_every_block_and_folds(llama, tokens, calibration):
    weights = {name: p.clone() for name, p in llama.named_parameters()}
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    handle = sparsify(
        llama, CONFIG, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-3, holdout=0.0)
    )
    blocks = handle.calibration["blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert handle.label == f"{CONFIG.label} lr=0.001"  # not block-mse's 5e-3
    assert all(b["steps"] == 6 and b["kept_step"] > 0 and b["loss_after"] < b["loss_before"] for b in blocks)
    assert all(layer.folded for layer in handle.layers.values())
    moved = [layer.state("learnable").shift.abs().max() > 0 for layer in handle.layers.values()]
    assert all(moved)
    assert all(not p.requires_grad for layer in handle.layers.values() for p in layer.state("learnable").parameters())
    handle.remove()
    for name, parameter in llama.named_parameters():  # the model's own weights never change
        assert torch.equal(parameter, weights[name]) and parameter.requires_grad
    with torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, dense)


def test_a_fit_that_makes_a_block_worse_is_undone(llama, calibration):
    # On this tiny random model a learning rate of 1e-1 overshoots in both blocks.
    handle = sparsify(
        llama, CONFIG, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-1, holdout=0.0)
    )
    assert not any(b["kept_step"] for b in handle.calibration["blocks"])
    assert all(b["loss_after"] == b["loss_before"] for b in handle.calibration["blocks"])
    for layer in handle.layers.values():
        assert torch.equal(layer.state("learnable").scale, torch.ones_like(layer.state("learnable").scale))
        assert torch.equal(layer.state("learnable").shift, torch.zeros_like(layer.state("learnable").shift))


def test_default_steps_are_one_pass_over_the_fitted_windows(llama, calibration):
    handle = sparsify(llama, CONFIG, calibration)  # 4 windows: 3 fitted, 1 held out
    assert [b["steps"] for b in handle.calibration["blocks"]] == [3, 3]
    assert handle.label == CONFIG.label  # fitted at the objective's own rate: nothing to add


def test_a_diverging_block_is_named_and_the_model_left_dense(llama, tokens, calibration):
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    settings = CalibrationSettings(steps=4, lr=1e6, warmup=0.0, explode=1.5)
    with pytest.raises(ActsparseError, match=r"Calibration of block model\.layers\.0 diverged"):
        sparsify(llama, CONFIG, calibration, calibration_settings=settings)
    with torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, dense)


def test_learnable_needs_calibration_text(llama):
    with pytest.raises(ActsparseError, match="need calibration text"):
        sparsify(llama, CONFIG)


def test_decoder_blocks_must_hold_the_layers(llama):
    assert len(decoder_blocks(llama, ["model.layers.1.mlp.up_proj"])) == 2
    with pytest.raises(ActsparseError, match="nn.ModuleList"):
        decoder_blocks(llama, ["model.layers.1.mlp.up_proj", "lm_head"])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 0}, "at least 1"),
        ({"lr": 0.0}, "must be positive"),
        ({"lr": (1e-3, -1e-3)}, "Learning rate -0.001 must be positive"),
        ({"lr": ()}, "No learning rate given"),
        ({"warmup": 1.0}, "outside"),
        ({"holdout": 1.0}, "outside"),
        ({"checks": 0}, "at least 1"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(ActsparseError, match=message):
        CalibrationSettings(**settings)


def test_several_learning_rates_are_a_search_and_one_is_a_rate():
    assert CalibrationSettings(lr=[1e-3]).lr == 1e-3 and CalibrationSettings(lr=1e-3).rates == (1e-3,)
    search = CalibrationSettings(lr=[1e-3, 1e-4, 1e-3])
    assert search.rates == (1e-3, 1e-4) and search.to_dict()["lr"] == [1e-3, 1e-4]
    assert settings_for(search, "output-kl", 8).rates == (1e-3, 1e-4)  # not replaced by the default
    assert settings_for(CalibrationSettings(), "output-kl", 8).rates == (1e-3,)


def test_a_rate_search_keeps_the_best_held_out_fit_of_any_rate(llama, calibration):
    # On this tiny random model 1e-1 overshoots in both blocks and 1e-3 helps in both.
    fitted = {}
    for lr in (1e-3, (1e-1, 1e-3)):
        settings = CalibrationSettings(steps=6, lr=lr, holdout=0.0)
        handle = sparsify(llama, CONFIG, calibration, calibration_settings=settings)
        fitted[lr] = (
            handle.calibration["blocks"],
            {name: layer.state("learnable").shift.clone() for name, layer in handle.layers.items()},
        )
        handle.remove()
    assert handle.label == f"{CONFIG.label} lr=0.1,0.001"
    (single, single_shifts), (searched, searched_shifts) = fitted[1e-3], fitted[(1e-1, 1e-3)]
    assert all(block["kept_step"] and block["lr"] == 1e-3 for block in searched)
    for alone, among in zip(single, searched):  # the 1e-3 fit of the search is the 1e-3 fit itself
        assert among == {**alone, "by_rate": among["by_rate"]}
        assert among["by_rate"][1] == alone["by_rate"][0] and among["by_rate"][0][1] > among["loss_after"]
    assert all(torch.equal(searched_shifts[name], shift) for name, shift in single_shifts.items())


def test_a_rate_that_diverges_ends_its_run_and_the_others_stand(capsys):
    from actsparse.calibration.fitting import _fit

    def fit_at(lr):
        value = torch.nn.Parameter(torch.zeros(1))
        settings = CalibrationSettings(steps=40, lr=lr, warmup=0.0, checks=8)
        held_loss = lambda: (value.item() - 0.5) ** 2  # the fitted text wants 1
        fit = _fit("block", [value], lambda step: (value - 1).pow(2).sum(), held_loss, settings, 0.0, False)
        return fit, value.item()

    slow, fast = fit_at(2e-3), fit_at(5e-2)
    assert slow[0].loss_after > 2 * fast[0].loss_after  # 2e-3 moves too little in 40 steps
    searched = fit_at((1e6, 2e-3, 5e-2))
    assert searched[1] == fast[1] and searched[0].lr == fast[0].lr == 5e-2
    assert searched[0].kept_step == fast[0].kept_step and searched[0].loss_after == fast[0].loss_after
    assert searched[0].by_rate == ((1e6, None), (2e-3, slow[0].loss_after), (5e-2, fast[0].loss_after))
    assert "diverged at lr 1e+06, step 2" in capsys.readouterr().out
    with pytest.raises(ActsparseError, match=r"Calibration of block block diverged at lr 1e\+06, step 2"):
        fit_at(1e6)


def test_the_normed_objective_measures_each_block_through_the_norm_that_reads_it(llama, calibration):
    from actsparse.calibration.fitting import _reading_norms

    blocks = decoder_blocks(llama, ["model.layers.0.mlp.up_proj"])
    readers = _reading_norms(llama, blocks, calibration[0])
    assert readers == {
        "model.layers.0": llama.model.layers[1].input_layernorm,
        "model.layers.1": llama.model.norm,
    }
    config = SparsityConfig(
        pattern="2:4", criterion="amber", corrections=(Learnable(objective="block-normed"),)
    )
    handle = sparsify(
        llama, config, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-3, holdout=0.0)
    )
    blocks = handle.calibration["blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b["kept_step"] and b["loss_after"] < b["loss_before"] for b in blocks)
    assert all(not p.requires_grad for layer in handle.layers.values() for p in layer.state("learnable").parameters())
    assert all(p.requires_grad for p in llama.model.norm.parameters())


def test_the_output_kl_objective_fits_every_layer_together_and_lowers_the_kl(llama, tokens, calibration):
    from actsparse.calibration.fitting import _kl

    weights = {name: p.clone() for name, p in llama.named_parameters()}
    plain = SparsityConfig(pattern="2:4", criterion="amber")
    with torch.no_grad():
        dense = llama(calibration, use_cache=False).logits
        handle = sparsify(llama, plain)
        before = _kl(llama(calibration, use_cache=False).logits, dense).item()
        handle.remove()
    config = SparsityConfig(pattern="2:4", criterion="amber", corrections=(Learnable(objective="output-kl"),))
    handle = sparsify(
        llama, config, calibration, calibration_settings=CalibrationSettings(steps=24, lr=1e-3, holdout=0.0)
    )
    [fit] = handle.calibration["blocks"]
    assert fit["block"] == "model" and fit["steps"] == 24 and fit["kept_step"]
    assert fit["loss_before"] == pytest.approx(before, rel=1e-4)  # the KL of plain sparsity, per window
    with torch.no_grad():
        after = _kl(llama(calibration, use_cache=False).logits, dense).item()
    assert after == pytest.approx(fit["loss_after"], rel=1e-3) and after < 0.9 * before
    assert all(torch.count_nonzero(layer.state("learnable").shift) for layer in handle.layers.values())
    handle.remove()
    for name, parameter in llama.named_parameters():
        assert torch.equal(parameter, weights[name]) and parameter.requires_grad


@pytest.mark.parametrize("objective", ["block-mse", "output-kl"])
def test_input_only_corrections_leave_the_output_ones_neutral(llama, calibration, objective):
    config = SparsityConfig(
        pattern="2:4", criterion="amber", corrections=(Learnable(objective=objective, learn="input"),)
    )
    handle = sparsify(
        llama, config, calibration, calibration_settings=CalibrationSettings(steps=4, lr=1e-3, holdout=0.0)
    )
    corrections = [layer.state("learnable") for layer in handle.layers.values()]
    assert all(torch.count_nonzero(c.shift) and torch.any(c.scale != 1) for c in corrections)
    assert not any(
        torch.count_nonzero(c.output_scale) or torch.count_nonzero(c.output_bias) for c in corrections
    )
    handle.remove()


def test_the_end_to_end_fit_takes_a_lower_rate_when_the_output_vectors_are_fitted_too(llama, calibration):
    rates = {}
    for learn in LEARNABLE_PARTS:
        config = SparsityConfig(pattern="2:4", corrections=(Learnable(learn=learn),))
        handle = sparsify(llama, config, calibration, calibration_settings=CalibrationSettings(steps=2))
        rates[learn] = handle.calibration["settings"]["lr"]
        assert handle.label == config.label  # each its own default: no lr word
        handle.remove()
    assert rates == {"input": 1e-3, "input+output": 1e-4}


def test_labels_say_when_the_output_corrections_are_fitted_too():
    fitted = {
        learn: SparsityConfig(pattern="2:4", corrections=(Learnable(learn=learn),))
        for learn in LEARNABLE_PARTS
    }
    assert fitted["input"] == SparsityConfig(pattern="2:4", corrections="learnable")  # the default
    assert "learn=" not in fitted["input"].label and "learn=input+output" in fitted["input+output"].label


def test_an_unknown_objective_is_refused():
    with pytest.raises(ActsparseError, match="Unknown objective 'mse'; choose one of block-mse"):
        SparsityConfig(pattern="2:4", corrections=(Learnable(objective="mse"),))


def test_unknown_learned_parts_are_refused():
    with pytest.raises(ActsparseError, match="Unknown learn='output'; choose one of input"):
        SparsityConfig(pattern="2:4", corrections=(Learnable(learn="output"),))


def test_calibration_holds_out_the_last_windows_to_judge_the_fit():
    assert CalibrationSettings().split(4) == (range(3), range(3, 4))
    assert CalibrationSettings(holdout=0.5).split(8) == (range(4), range(4, 8))
    assert CalibrationSettings(holdout=0.9).split(4) == (range(1), range(1, 4))  # one is always fitted
    assert CalibrationSettings().split(1) == (range(1), range(1))  # one window does both
    assert CalibrationSettings(holdout=0.0).split(4) == (range(4), range(4))


def test_a_fit_ends_at_its_best_held_out_check_not_at_its_last_step():
    from actsparse.calibration.fitting import _fit

    value = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def held_loss() -> float:  # the held-out text wants 0.5; the fitted text wants 1
        seen.append(value.item())
        return (value.item() - 0.5) ** 2

    settings = CalibrationSettings(steps=40, lr=0.05, warmup=0.0, checks=8)
    fit = _fit("block", [value], lambda step: (value - 1).pow(2).sum(), held_loss, settings, 0.0, False)
    assert len(seen) == 9 and seen[-1] > 0.9  # checked at the start and 8 times; the fit went past 0.5
    best = min(range(1, 9), key=lambda check: abs(seen[check] - 0.5))
    assert fit.kept_step == 5 * best and value.item() == seen[best]
    assert fit.loss_before == 0.25 and fit.loss_after == (seen[best] - 0.5) ** 2
