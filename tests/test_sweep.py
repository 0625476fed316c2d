"""Sweeps: resumable one configuration at a time, with tables and plots."""

import csv
import json

import pytest

from actsparse import ActsparseError, SparsityConfig
from actsparse.eval.evaluate import evaluate
from actsparse.eval.sweep import SweepData, config_key, ray_evaluations, read_sweep_file, run_sweep

CONFIGS = [
    SparsityConfig(pattern=p, criterion=c)
    for p in ("2:4", "8:16", "unstructured:0.5")
    for c in ("magnitude", "amber")
]
DATA = SweepData("tiny llama", "sotu", seqlen=16, windows=2, calib_windows=2)


class Killed(Exception):
    pass


def test_a_killed_sweep_resumes_with_every_configuration_exactly_once(llama, tokens, tmp_path):
    calls = []

    def evaluations(kill_at=None):
        def run(pending):
            for config in pending:
                if len(calls) == kill_at:
                    raise Killed
                calls.append(config_key(config))
                yield config, evaluate(llama, tokens, [config], progress=False)

        return run

    with pytest.raises(Killed):
        run_sweep(CONFIGS, tmp_path, DATA, evaluations(kill_at=2), progress=False)
    assert len(list((tmp_path / "configs").glob("*.json"))) == 2
    assert not list(tmp_path.glob("configs/.*"))  # nothing half-written
    records = run_sweep(CONFIGS, tmp_path, DATA, evaluations(), progress=False)
    assert sorted(calls) == sorted(config_key(c) for c in CONFIGS)  # each evaluated exactly once
    assert [r["label"] for r in records] == [c.label for c in CONFIGS]
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["label"] for r in rows] == [c.label for c in CONFIGS]
    assert rows[0]["index_bits"] == "3" and rows[-1]["index_bits"] == "bitmap"
    assert "| 8:16 amber | " in (tmp_path / "sweep.md").read_text()
    for plot in ("quality_vs_pattern.png", "quality_vs_flops.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_a_directory_of_another_sweep_is_refused(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"model": "other", "text": "other"}))
    with pytest.raises(ActsparseError, match="holds a sweep of another model"):
        run_sweep(CONFIGS[:1], tmp_path, DATA, lambda pending: iter(()), progress=False)


def test_ray_runs_the_configurations_on_workers(local_model, tmp_path):
    pytest.importorskip("ray")  # the optional `ray` extra; not installed by `make test`
    import ray

    model, text = local_model
    data = SweepData(str(model), str(text), seqlen=32, windows=2, calib_windows=2)
    try:
        records = run_sweep(CONFIGS[:2], tmp_path, data, ray_evaluations("local", data), progress=False)
    finally:
        ray.shutdown()
    assert [r["label"] for r in records] == [c.label for c in CONFIGS[:2]]
    assert all(r["dense_perplexity"] == records[0]["dense_perplexity"] for r in records)


def test_sweep_file(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text('pattern: ["2:4", "8:16"]\ncriterion: magnitude,amber\nphase: all\nflop_share: 0.6\n')
    assert read_sweep_file(path) == {
        "pattern": ["2:4", "8:16"],
        "criterion": "magnitude,amber",
        "phase": "all",
        "flop_share": 0.6,
    }
    for unquoted in ("pattern: [2:4, 8:16]\n", "pattern: 2:4\n"):
        path.write_text(unquoted)
        with pytest.raises(ActsparseError, match="must be quoted"):
            read_sweep_file(path)
    path.write_text("colour: red\n")
    with pytest.raises(ActsparseError, match="Unknown key"):
        read_sweep_file(path)


def test_a_sweep_runs_one_dense_pass_per_window_for_all_its_configurations(local_model, tmp_path):
    from actsparse.eval.sweep import load_sweep_inputs, local_evaluations

    model, text = local_model
    data = SweepData(str(model), str(text), seqlen=32, windows=3, calib_windows=2)
    loaded, windows, _ = load_sweep_inputs(data, False)
    passes = []
    hook = loaded.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    try:
        records = run_sweep(CONFIGS, tmp_path / "sweep", data, local_evaluations(data), progress=False)
    finally:
        hook.remove()
    assert sum(passes) == (len(CONFIGS) + 1) * len(windows)  # 6 + 1 passes per window, not 12
    alone = evaluate(loaded, windows, [CONFIGS[3]], progress=False)
    assert records[3]["kl_to_dense"] == pytest.approx(alone[1].kl_to_dense, rel=1e-5)
    assert records[3]["dense_perplexity"] == pytest.approx(alone[0].perplexity, rel=1e-6)


def test_an_interrupted_group_resumes_without_repeating_its_windows(local_model, tmp_path, monkeypatch):
    import importlib

    from actsparse.eval.sweep import load_sweep_inputs, local_evaluations

    evaluation = importlib.import_module("actsparse.eval.evaluate")  # the module, not the function
    model, text = local_model
    data = SweepData(str(model), str(text), seqlen=32, windows=3, calib_windows=2)
    loaded, windows, _ = load_sweep_inputs(data, False)
    checkpoint, out = tmp_path / "group.partial.json", tmp_path / "sweep"
    original = evaluation._checkpoint_state

    def killed_after_two(key, done, *args):
        state = original(key, done, *args)
        if done == 2:
            evaluation.write_json_atomic(checkpoint, state)
            raise Killed
        return state

    monkeypatch.setattr(evaluation, "_checkpoint_state", killed_after_two)
    with pytest.raises(Killed):
        run_sweep(CONFIGS[:2], out, data, local_evaluations(data, checkpoint), progress=False)
    monkeypatch.setattr(evaluation, "_checkpoint_state", original)
    passes = []
    hook = loaded.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    try:
        records = run_sweep(CONFIGS[:2], out, data, local_evaluations(data, checkpoint), progress=False)
    finally:
        hook.remove()
    assert sum(passes) == 3  # the third window only, dense and two configurations
    assert not checkpoint.exists()
    alone = evaluate(loaded, windows, CONFIGS[:2], progress=False)
    assert [r["perplexity"] for r in records] == pytest.approx([row.perplexity for row in alone[1:]])
