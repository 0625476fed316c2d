"""Recipes: saved and loaded bit for bit, and refused when they do not fit."""

import json
from dataclasses import replace

import pytest
import torch

from actsparse import ActsparseError, SparsityConfig, sparsify
from actsparse.config import CalibrationSettings
from actsparse.io.recipe import load_recipe
from actsparse.pieces.policies import AmberRule

CONFIG = SparsityConfig(
    pattern="2:4",
    criterion="amber",
    corrections="smoothquant+shift+learnable",
    policy=AmberRule(flop_share=0.3),
)


def calibrate_and_save(llama, tokens, config, folder):
    """Calibrate ``config`` on ``llama``, save its recipe in ``folder``; the calibrated logits."""
    calibration = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    handle = sparsify(llama, config, calibration, calibration_settings=CalibrationSettings(steps=3, lr=1e-3))
    with torch.no_grad():
        logits = llama(tokens, use_cache=False).logits
    handle.recipe().save(folder)
    handle.remove()
    return logits


@pytest.fixture
def saved(llama, tokens, tmp_path):
    """A calibrated recipe folder and the logits of the model it was calibrated on."""
    return tmp_path / "recipe", calibrate_and_save(llama, tokens, CONFIG, tmp_path / "recipe")


def test_round_trip_is_bit_identical(llama, tokens, saved):
    folder, logits = saved
    recipe = load_recipe(folder)
    assert recipe.config == CONFIG and recipe.calibration["blocks"]
    assert any(name.endswith(".input_max") for name in recipe.tensors)
    with sparsify(llama, recipe=recipe) as handle:
        with torch.no_grad():
            assert torch.equal(llama(tokens, use_cache=False).logits, logits)
        assert handle.describe()["skipped_layers"]  # the policy's choice came from the recipe


def test_a_recipe_for_another_model_is_refused(qwen2, saved):
    with pytest.raises(ActsparseError, match="calibrated for another model"):
        sparsify(qwen2, recipe=load_recipe(saved[0]))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_tensors_are_refused(saved, damage):
    path = saved[0] / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(ActsparseError, match="corrupted or truncated"):
        load_recipe(saved[0])


def test_corrupted_description_is_refused(saved):
    (saved[0] / "recipe.json").write_text('{"format": 1, "config": ')
    with pytest.raises(ActsparseError, match="recipe.json is corrupted"):
        load_recipe(saved[0])


def test_missing_tensor_is_refused(llama, saved, tmp_path):
    recipe = load_recipe(saved[0])
    del recipe.tensors[next(name for name in recipe.tensors if name.endswith("correction.scale"))]
    recipe.save(tmp_path / "incomplete")
    with pytest.raises(ActsparseError, match="lacks the tensor .*correction.scale"):
        sparsify(llama, recipe=load_recipe(tmp_path / "incomplete"))


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ActsparseError, match="is not a recipe folder"):
        load_recipe(tmp_path / "nothing")


def test_recipe_and_a_different_config_are_refused(llama, saved):
    with pytest.raises(ActsparseError, match="either a config or a recipe"):
        sparsify(llama, SparsityConfig(), recipe=load_recipe(saved[0]))


def test_recipe_file_is_plain_json(saved):
    description = json.loads((saved[0] / "recipe.json").read_text())
    assert description["model"]["model_type"] == "llama" and len(description["tensors_sha256"]) == 64


FORMAT_1_CONFIG = {  # actsparse 0.1's flat config of CONFIG, as its recipes hold it
    "pattern": "2:4",
    "criterion": "amber",
    "phase": "prefill",
    "include": ["(q|k|v|o|gate|up|down)_proj$"],
    "exclude": [],
    "remainder": "error",
    "policy": "amber",
    "flop_share": 0.3,
    "amber_skip": 5,
    "smooth": "smoothquant",
    "smooth_alpha": 0.5,
    "quant": "none",
    "quant_exclude": [],
    "mitigation": "shift+learnable",
    "shift_statistic": "median",
    "backend": "emulated",
}


def test_a_format_1_recipe_still_loads_bit_for_bit(llama, tokens, saved):
    folder, logits = saved
    description = json.loads((folder / "recipe.json").read_text())
    assert description["format"] == 4 and description["config"]["policy"]["name"] == "amber"
    (folder / "recipe.json").write_text(json.dumps(description | {"format": 1, "config": FORMAT_1_CONFIG}))
    recipe = load_recipe(folder)
    assert recipe.config == as_saved_before_learn(CONFIG)
    with sparsify(llama, recipe=recipe), torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, logits)


def as_saved_before_learn(config: SparsityConfig) -> SparsityConfig:
    """``config`` with its learnable corrections fitting the output too, as all did before ``learn``."""
    corrections = tuple(
        replace(c, learn="input+output") if c.name == "learnable" else c for c in config.corrections
    )
    return replace(config, corrections=corrections)


def test_a_recipe_saved_before_learn_existed_reads_as_fitting_the_output_too(llama, tokens, saved):
    folder, logits = saved
    description = json.loads((folder / "recipe.json").read_text())
    assert CONFIG.corrections[-1].learn == "input"  # the default now
    [learnable] = [piece for piece in description["config"]["corrections"] if piece["name"] == "learnable"]
    del learnable["learn"]  # as saved before the setting existed, in format 2
    config = {("mitigation" if key == "corrections" else key): v for key, v in description["config"].items()}
    (folder / "recipe.json").write_text(json.dumps(description | {"format": 2, "config": config}))
    recipe = load_recipe(folder)
    assert recipe.config == as_saved_before_learn(CONFIG) and "learn=input+output" in recipe.config.label
    with sparsify(llama, recipe=recipe), torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, logits)


def test_a_recipe_of_an_unknown_format_is_refused(saved):
    description = json.loads((saved[0] / "recipe.json").read_text())
    (saved[0] / "recipe.json").write_text(json.dumps(description | {"format": 7}))
    with pytest.raises(ActsparseError, match="format 7.*reads formats 1, 2, 3 and 4"):
        load_recipe(saved[0])


def test_a_regrouped_recipe_round_trips_bit_for_bit(llama, tokens, tmp_path):
    # The channel order is not saved: it is derived again from the saved statistics and weights,
    # after smoothing, and the learned corrections live in that order.
    config = SparsityConfig(pattern="8:16", criterion="amber", corrections="smoothquant+permute+learnable")
    logits = calibrate_and_save(llama, tokens, config, tmp_path / "recipe")
    recipe = load_recipe(tmp_path / "recipe")
    assert any(name.endswith(".input_mean_square") for name in recipe.tensors)
    with sparsify(llama, recipe=recipe), torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, logits)


def test_a_mixed_pattern_recipe_round_trips_bit_for_bit(llama, tokens, tmp_path):
    from actsparse.pieces.policies import OutputKl

    config = SparsityConfig(
        pattern="2:4",
        rest_pattern="3:4",
        policy=OutputKl(flop_share=0.4, kl_windows=2),
        corrections="permute+learnable",
    )
    logits = calibrate_and_save(llama, tokens, config, tmp_path / "recipe")
    recipe = load_recipe(tmp_path / "recipe")
    with sparsify(llama, recipe=recipe) as handle, torch.no_grad():
        assert torch.equal(llama(tokens, use_cache=False).logits, logits)
        patterns = {str(layer.pattern) for layer in handle.layers.values()}
        assert patterns == {"2:4", "3:4"} and set(handle.policy_layers) == set(recipe.sparse_layers)


def test_a_recipe_runs_at_another_phase_and_refuses_other_changes(llama, tokens, saved):
    folder, logits = saved
    recipe = load_recipe(folder)
    every_call = recipe.computed(phase="all")
    assert every_call.config.phase == "all" and every_call.tensors is recipe.tensors
    with sparsify(llama, recipe=every_call):
        with torch.no_grad():  # one forward over the window is a prefill either way
            assert torch.equal(llama(tokens, use_cache=False).logits, logits)
    with pytest.raises(ActsparseError, match="pattern is part of what was calibrated"):
        recipe.computed(pattern="2:4")
