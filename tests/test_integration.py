"""The real embedded models on the real evaluation text (converted into the cache on first use)."""

import functools

import pytest
import torch

from actsparse import CalibrationSettings, SparsityConfig, evaluate, load_model
from actsparse.io.text import load_text, token_windows
from actsparse.pieces.corrections import Learnable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_windows():
    _, tokenizer = loaded("smollm2-135m")
    return token_windows(tokenizer, load_text("sotu", "evaluation"), seqlen=256, max_windows=4)


@pytest.fixture(scope="module")
def smollm2_rows(smollm2_windows):
    model, _ = loaded("smollm2-135m")
    configs = [SparsityConfig(pattern=p, criterion="magnitude") for p in ("2:4", "8:16", "16:32")]
    return {row.label: row for row in evaluate(model, smollm2_windows, configs, progress=False)}


def test_dense_perplexity_is_that_of_a_real_model(smollm2_rows, smollm2_windows):
    # A converted model that reads the text at all beats the tokens' own unigram frequencies on the
    # very windows it is scored on (a broken conversion scores far above them).
    targets = smollm2_windows[:, 1:].flatten()
    counts = torch.bincount(targets).double()
    unigram = torch.exp(-(counts[targets] / targets.numel()).log().mean()).item()
    assert smollm2_rows["dense"].perplexity < unigram


def test_larger_groups_are_better_at_equal_density(smollm2_rows):
    ppl = {label: row.perplexity for label, row in smollm2_rows.items()}
    assert ppl["dense"] < ppl["16:32 magnitude"] < ppl["8:16 magnitude"] < ppl["2:4 magnitude"]
    kl = {label: row.kl_to_dense for label, row in smollm2_rows.items()}
    assert kl["16:32 magnitude"] < kl["8:16 magnitude"] < kl["2:4 magnitude"]


@functools.cache
def loaded(name):
    """The real model ``name``, loaded once for every test of this file (each leaves it dense)."""
    return load_model(name)


def model_and_windows(name, calibration_windows=8):
    """The real model ``name``, calibration windows (128 tokens, calibration split) and evaluation
    windows (4 × 256 tokens, evaluation split) of the sotu text."""
    model, tokenizer = loaded(name)
    calibration = token_windows(
        tokenizer, load_text("sotu", "calibration"), seqlen=128, max_windows=calibration_windows
    )
    windows = token_windows(tokenizer, load_text("sotu", "evaluation"), seqlen=256, max_windows=4)
    return model, calibration, windows


def test_corrections_fitted_end_to_end_lower_the_kl_more_than_block_by_block():
    # Corrections on the first four blocks only, so the test stays short; calibration and
    # evaluation use different splits of the text. On Gemma the block-wise MSE is spent on a few
    # residual channels of huge magnitude; the end-to-end KL objective is not (on SmolLM2 both
    # lower the KL: the demo's recipes and tests/test_shipped_recipes.py cover its end-to-end fit).
    model, calibration, windows = model_and_windows("gemma3-270m")
    first_blocks = (r"layers\.[0-3]\..*_proj$",)
    configs = [SparsityConfig(pattern="8:16", criterion="amber", include=first_blocks)] + [
        SparsityConfig(
            pattern="8:16",
            criterion="amber",
            include=first_blocks,
            corrections=(Learnable(objective=objective),),
        )
        for objective in ("block-mse", "output-kl")
    ]
    # 4 passes over the 6 fitted windows (2 held out): the objective's two passes over so few
    # short windows barely move the corrections.
    settings = CalibrationSettings(steps=24)
    _, plain, block_mse, output_kl = evaluate(
        model, windows, configs, calibration, calibration_settings=settings, progress=False
    )
    assert output_kl.config["calibration"]["blocks"][0]["kept_step"] > 0
    assert output_kl.kl_to_dense < min(plain.kl_to_dense, block_mse.kl_to_dense)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_regrouped_channels_lower_the_kl_at_8_16(name):
    # In the models' own channel order, inputs that are large together share groups; dealt across
    # the groups by their calibration statistics, each group keeps more of what matters.
    model, calibration, windows = model_and_windows(name)
    configs = [SparsityConfig(pattern="8:16", criterion="amber", corrections=m) for m in ("none", "permute")]
    _, plain, permuted = evaluate(model, windows, configs, calibration, progress=False)
    assert permuted.kl_to_dense < plain.kl_to_dense


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_a_mixed_pattern_beats_one_pattern_on_fewer_layers_at_equal_removed_flops(name):
    # 27.5% of linear FLOPs removed both ways: 8:16 on 55% with the rest dense, or 8:16 on 10% and
    # 12:16 on the rest (0.5 × 0.1 + 0.25 × 0.9); a little sparsity everywhere costs less.
    from actsparse.pieces.policies import Budget

    model, calibration, windows = model_and_windows(name, calibration_windows=4)
    configs = [
        SparsityConfig(pattern="8:16", criterion="amber", policy=Budget(flop_share=0.55)),
        SparsityConfig(
            pattern="8:16", criterion="amber", policy=Budget(flop_share=0.1), rest_pattern="12:16"
        ),
    ]
    _, concentrated, mixed = evaluate(model, windows, configs, calibration, progress=False)
    for row in (concentrated, mixed):
        assert row.flops["removed_share"] == pytest.approx(0.275, abs=0.01)
    assert mixed.kl_to_dense < concentrated.kl_to_dense
