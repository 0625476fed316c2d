"""The real SmolLM2-135M on the real evaluation text (converted into the cache by `make test`)."""

import pytest

from actsparse import SparsityConfig, evaluate, load_model
from actsparse.data import load_text, token_windows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_rows():
    model, tokenizer = load_model("smollm2-135m")
    windows = token_windows(tokenizer, load_text("sotu", "evaluation"), seqlen=256, max_windows=8)
    configs = [SparsityConfig(pattern=p, criterion="magnitude") for p in ("2:4", "8:16", "16:32")]
    return {row.label: row for row in evaluate(model, windows, configs, progress=False)}


def test_dense_perplexity_is_that_of_a_real_model(smollm2_rows):
    # A random model of this vocabulary scores about 49,000; SmolLM2-135M reads these speeches at ~30.
    assert 15 < smollm2_rows["dense"].perplexity < 45


def test_larger_groups_are_better_at_equal_density(smollm2_rows):
    ppl = {label: row.perplexity for label, row in smollm2_rows.items()}
    assert ppl["dense"] < ppl["16:32 magnitude"] < ppl["8:16 magnitude"] < ppl["2:4 magnitude"]
    kl = {label: row.kl_to_dense for label, row in smollm2_rows.items()}
    assert kl["16:32 magnitude"] < kl["8:16 magnitude"] < kl["2:4 magnitude"]


def test_calibrated_corrections_lower_the_kl_of_a_real_model():
    # Corrections on the first four blocks only, so the test stays short; calibration and
    # evaluation use different splits of the text.
    model, tokenizer = load_model("smollm2-135m")
    calibration = token_windows(tokenizer, load_text("sotu", "calibration"), seqlen=128, max_windows=8)
    windows = token_windows(tokenizer, load_text("sotu", "evaluation"), seqlen=256, max_windows=4)
    first_blocks = (r"layers\.[0-3]\..*_proj$",)
    plain = SparsityConfig(pattern="8:16", criterion="magnitude", include=first_blocks)
    learned = SparsityConfig(
        pattern="8:16", criterion="magnitude", include=first_blocks, mitigation="learnable"
    )
    rows = evaluate(model, windows, [plain, learned], calibration, progress=False)
    assert all(block["kept"] for block in rows[2].config["calibration"]["blocks"][:4])
    assert rows[2].kl_to_dense < 0.9 * rows[1].kl_to_dense  # measured: 0.198 → 0.150
