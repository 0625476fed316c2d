"""Calibration of the learned corrections (block by block, and end to end), on a tiny random Llama."""

import pytest
import torch

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.calibrate import CalibrationSettings, decoder_blocks
from actsparse.corrections import Learnable, Shift

CONFIG = SparsityConfig(pattern="2:4", criterion="amber", mitigation=(Shift(), Learnable(objective="block-mse")))


@pytest.fixture
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))


def test_calibration_fits_every_block_and_folds(llama, tokens, calibration):
    weights = {name: p.clone() for name, p in llama.named_parameters()}
    with torch.no_grad():
        dense = llama(tokens, use_cache=False).logits
    handle = sparsify(llama, CONFIG, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-3))
    blocks = handle.calibration["blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b["steps"] == 6 and b["kept"] and b["loss_after"] < b["loss_before"] for b in blocks)
    assert all(layer.folded for layer in handle.layers.values())
    moved = [layer.correction.shift.abs().max() > 0 for layer in handle.layers.values()]
    assert all(moved)
    assert all(not p.requires_grad for layer in handle.layers.values() for p in layer.correction.parameters())
    handle.remove()
    for name, parameter in llama.named_parameters():  # the model's own weights never change
        assert torch.equal(parameter, weights[name]) and parameter.requires_grad
    with torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, dense)


def test_a_fit_that_makes_a_block_worse_is_undone(llama, calibration):
    # On this tiny random model a learning rate of 1e-2 overshoots in both blocks.
    handle = sparsify(llama, CONFIG, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-2))
    assert not any(b["kept"] for b in handle.calibration["blocks"])
    assert all(b["loss_after"] == b["loss_before"] for b in handle.calibration["blocks"])
    for layer in handle.layers.values():
        assert torch.equal(layer.correction.scale, torch.ones_like(layer.correction.scale))
        assert torch.equal(layer.correction.shift, torch.zeros_like(layer.correction.shift))


def test_default_steps_are_one_pass_over_the_windows(llama, calibration):
    handle = sparsify(llama, CONFIG, calibration)
    assert [b["steps"] for b in handle.calibration["blocks"]] == [4, 4]


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
    [({"steps": 0}, "at least 1"), ({"lr": 0.0}, "must be positive"), ({"warmup": 1.0}, "outside")],
)
def test_bad_settings(settings, message):
    with pytest.raises(ActsparseError, match=message):
        CalibrationSettings(**settings)


def test_the_normed_objective_measures_each_block_through_the_norm_that_reads_it(llama, calibration):
    from actsparse.calibrate import _reading_norms

    blocks = decoder_blocks(llama, ["model.layers.0.mlp.up_proj"])
    readers = _reading_norms(llama, blocks, calibration[0])
    assert readers == {"model.layers.0": llama.model.layers[1].input_layernorm, "model.layers.1": llama.model.norm}
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation=(Learnable(objective="block-normed"),))
    handle = sparsify(llama, config, calibration, calibration_settings=CalibrationSettings(steps=6, lr=1e-3))
    blocks = handle.calibration["blocks"]
    assert [b["block"] for b in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(b["kept"] and b["loss_after"] < b["loss_before"] for b in blocks)
    assert all(not p.requires_grad for layer in handle.layers.values() for p in layer.correction.parameters())
    assert all(p.requires_grad for p in llama.model.norm.parameters())


def test_the_output_kl_objective_fits_every_layer_together_and_lowers_the_kl(llama, tokens, calibration):
    from actsparse.calibrate import _kl

    weights = {name: p.clone() for name, p in llama.named_parameters()}
    plain = SparsityConfig(pattern="2:4", criterion="amber")
    with torch.no_grad():
        dense = llama(calibration, use_cache=False).logits
        handle = sparsify(llama, plain)
        before = _kl(llama(calibration, use_cache=False).logits, dense).item()
        handle.remove()
    config = SparsityConfig(pattern="2:4", criterion="amber", mitigation=(Learnable(objective="output-kl"),))
    handle = sparsify(llama, config, calibration, calibration_settings=CalibrationSettings(steps=24, lr=1e-3))
    [fit] = handle.calibration["blocks"]
    assert fit["block"] == "model" and fit["steps"] == 24 and fit["kept"]
    assert fit["loss_before"] == pytest.approx(before, rel=1e-4)  # the KL of plain sparsity, per window
    with torch.no_grad():
        after = _kl(llama(calibration, use_cache=False).logits, dense).item()
    assert after == pytest.approx(fit["loss_after"], rel=1e-3) and after < 0.9 * before
    assert all(torch.count_nonzero(layer.correction.shift) for layer in handle.layers.values())
    handle.remove()
    for name, parameter in llama.named_parameters():
        assert torch.equal(parameter, weights[name]) and parameter.requires_grad


def test_an_unknown_objective_is_refused():
    with pytest.raises(ActsparseError, match="Unknown objective 'mse'; choose one of block-mse"):
        SparsityConfig(pattern="2:4", mitigation=(Learnable(objective="mse"),))
