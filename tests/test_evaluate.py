import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from actsparse import SparsityConfig, evaluate
from actsparse.core.paths import write_json_atomic
from actsparse.eval.evaluate import provenance_line, quality_table, results_document
from actsparse.pieces.policies import Budget
from actsparse.sparse.layer import SparseLinear


def test_dense_row_and_one_row_per_config_over_the_same_windows(llama, tokens):
    with torch.no_grad():
        dense_logits = llama(tokens, use_cache=False).logits
    configs = [
        SparsityConfig(pattern="2:4", criterion="magnitude"),
        SparsityConfig(pattern="8:16", criterion="amber"),
    ]
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
    write_json_atomic(path, results_document(rows, "tiny", "float32", {"source": "test"}))
    document = json.loads(path.read_text())
    assert document["rows"][1]["config"]["pattern"] == "2:4"
    assert {"torch", "transformers", "actsparse"} <= document["versions"].keys()
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]


def test_an_interrupted_run_resumes_to_the_same_figures(llama, tokens, tmp_path, monkeypatch):
    configs = [
        SparsityConfig(pattern="2:4", criterion="magnitude"),
        SparsityConfig(pattern="8:16", criterion="amber"),
    ]
    windows = torch.cat([tokens, tokens.flip(-1)])  # 4 windows
    uninterrupted = evaluate(llama, windows, configs, progress=False)

    checkpoint = tmp_path / "eval.json.partial"
    calls = {"n": 0}
    original_forward = type(llama).forward

    def failing_forward(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * (1 + len(configs)) + 1:  # the first pass of the third window
            raise KeyboardInterrupt
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(llama), "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):
        evaluate(llama, windows, configs, progress=False, checkpoint=checkpoint)
    assert json.loads(checkpoint.read_text())["windows_done"] == 2

    counted = {"n": 0}

    def counting_forward(self, *args, **kwargs):
        counted["n"] += 1
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(llama), "forward", counting_forward)
    resumed = evaluate(llama, windows, configs, progress=False, checkpoint=checkpoint)
    assert counted["n"] == 2 * (1 + len(configs))  # only the two missing windows ran
    # The totals stay until the caller has stored the results: a run that finds them complete
    # (killed after its last window) computes nothing again and gives the same figures.
    assert json.loads(checkpoint.read_text())["windows_done"] == 4
    counted["n"] = 0
    finished = evaluate(llama, windows, configs, progress=False, checkpoint=checkpoint)
    assert counted["n"] == 0
    for a, b, c in zip(uninterrupted, resumed, finished):
        assert a.perplexity == pytest.approx(b.perplexity, rel=1e-9) == c.perplexity
        assert a.kl_to_dense == pytest.approx(b.kl_to_dense, rel=1e-9) == c.kl_to_dense
        assert a.top1_agreement == b.top1_agreement == c.top1_agreement
        assert a.flops["measured_density"] == b.flops["measured_density"] == c.flops["measured_density"]


def test_a_checkpoint_of_another_run_is_ignored(llama, tokens, tmp_path):
    checkpoint = tmp_path / "eval.json.partial"
    checkpoint.write_text(json.dumps({"key": "another run", "windows_done": 2}))
    rows = evaluate(llama, tokens, [SparsityConfig(pattern="2:4")], progress=False, checkpoint=checkpoint)
    assert rows[0].perplexity == evaluate(llama, tokens, [], progress=False)[0].perplexity


@pytest.mark.parametrize("chunk", [7, 256])
def test_the_figures_are_perplexity_kl_and_agreement_computed_by_hand(llama, tokens, monkeypatch, chunk):
    import importlib

    from actsparse import sparsify

    monkeypatch.setattr(importlib.import_module("actsparse.core.distribution"), "CHUNK", chunk)  # several chunks
    config = SparsityConfig(pattern="2:4", criterion="amber")
    with torch.no_grad():
        dense = torch.log_softmax(llama(tokens, use_cache=False).logits[:, :-1].double(), -1)
        with sparsify(llama, config):
            sparse = torch.log_softmax(llama(tokens, use_cache=False).logits[:, :-1].double(), -1)
    targets = tokens[:, 1:, None]
    row = evaluate(llama, tokens, [config], progress=False, batch_size=2)[1]
    assert row.perplexity == pytest.approx(math.exp(-sparse.gather(-1, targets).mean()), rel=1e-5)
    kl = (dense.exp() * (dense - sparse)).sum(-1).mean()
    assert row.kl_to_dense == pytest.approx(float(kl), rel=1e-4, abs=1e-6)  # float32 sums of ~5 nats
    assert row.top1_agreement == pytest.approx(float((dense.argmax(-1) == sparse.argmax(-1)).double().mean()))


def test_rows_carry_the_time_each_variant_took_to_prepare_and_the_table_shows_it_when_it_matters(llama, tokens):
    rows = evaluate(llama, tokens, [SparsityConfig(pattern="2:4")], progress=False)
    assert rows[0].prepare_seconds is None and 0 <= rows[1].prepare_seconds < 60
    assert "prepared in" not in quality_table(rows, "t").columns  # a plain variant takes no time
    rows[1].prepare_seconds = 150.0
    table = quality_table(rows, "t")
    assert table.columns[-1] == "prepared in" and [line[-1] for line in table.rows] == ["—", "2.5 min"]


def test_results_keep_per_layer_details_only_when_asked_and_say_where_they_come_from(llama, tokens):
    config = SparsityConfig(pattern="2:4", policy=Budget(flop_share=0.5))
    rows = evaluate(llama, tokens, [config], calibration=tokens, progress=False)
    lean = results_document(rows, "tiny", "float32", {"source": "test"})
    full = results_document(rows, "tiny", "float32", {"source": "test"}, layer_details=True)
    assert "layers" not in lean["rows"][1]["flops"] and "sensitivity" not in lean["rows"][1]["config"]
    assert len(full["rows"][1]["flops"]["layers"]) == 14 and len(full["rows"][1]["config"]["sensitivity"]) == 14
    assert lean["rows"][1]["config"]["skipped_layers"] == full["rows"][1]["config"]["skipped_layers"]
    assert lean["rows"][1]["flops"]["removed_share"] == full["rows"][1]["flops"]["removed_share"]
    source = lean["provenance"]
    assert source["machine"] and source["threads"] == torch.get_num_threads() and source["command"]
    line = provenance_line(source)
    assert line.startswith("Measured on ") and source["date"] in line
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / ".git").exists() and shutil.which("git"):  # run from actsparse's own checkout
        assert source["commit"] and f"commit {source['commit']}" in line
    assert quality_table(rows, "t", line).markdown().rstrip().endswith(f"`{source['command']}`")
