import json
import math

import pytest
import torch

from actsparse import SparsityConfig, evaluate
from actsparse.evaluate import results_document
from actsparse.layers import SparseLinear
from actsparse.paths import write_json_atomic


def test_dense_row_and_one_row_per_config_over_the_same_windows(llama, tokens):
    with torch.no_grad():
        dense_logits = llama(tokens, use_cache=False).logits
    configs = [SparsityConfig(pattern="2:4", criterion="magnitude"), SparsityConfig(pattern="8:16", criterion="amber")]
    rows = evaluate(llama, tokens, configs, progress=False)
    assert [r.label for r in rows] == ["dense", "2:4 magnitude", "8:16 amber"]
    dense = rows[0]
    assert dense.kl_to_dense == pytest.approx(0, abs=1e-6) and dense.top1_agreement == 1
    log_probs = torch.log_softmax(dense_logits[:, :-1], -1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).mean()
    assert dense.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    for row in rows[1:]:
        assert row.kl_to_dense > 0 and 0 <= row.top1_agreement <= 1
        assert row.flops["sparse_share"] == 1 and row.flops["measured_density"] <= 0.5 + 1e-9
    assert not any(isinstance(m, SparseLinear) for m in llama.modules())


def test_results_are_written_atomically(llama, tokens, tmp_path):
    rows = evaluate(llama, tokens[:1], [SparsityConfig(pattern="2:4")], progress=False)
    path = tmp_path / "out" / "eval.json"
    write_json_atomic(path, results_document(rows, "tiny", {"source": "test"}))
    document = json.loads(path.read_text())
    assert document["rows"][1]["config"]["pattern"] == "2:4"
    assert {"torch", "transformers", "actsparse"} <= document["versions"].keys()
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]
