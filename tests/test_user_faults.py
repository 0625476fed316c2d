"""The bad inputs and faults a user meets: each ends in one sentence and exit status 2 (or is
survived), with nothing lost and no mixed results."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from actsparse import SparsityConfig, sparsify
from actsparse.cli import main


def run(monkeypatch, capsys, *args):
    capsys.readouterr()  # what fixtures printed is not this run's
    monkeypatch.setattr(sys, "argv", ["actsparse", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def error_line(err: str) -> str:
    """The error sentence: the last line of stderr, which must start with "error:"."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


def common(local_model, seqlen="32"):
    model, text = local_model
    return ["--model", str(model), "--dataset", str(text), "--seqlen", seqlen]


def files_under(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ---- data loss and wrong results ----------------------------------------------------------------


def test_calibrate_never_replaces_a_folder_or_file_that_is_not_a_recipe(
    monkeypatch, capsys, local_model, tmp_path
):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    for target in (folder, afile):
        code, _, err = run(monkeypatch, capsys, "calibrate", *common(local_model), "--calib-windows", "2",
                           "--calib-steps", "1", "--out", str(target))  # fmt: skip
        assert code == 2 and "Loading" not in err  # refused before any work
        assert "so that nothing of yours is replaced" in error_line(err) or "is a file" in error_line(err)
    assert (folder / "thesis.tex").read_text() == "years of work" and afile.read_text() == "keep me"
    recipe = tmp_path / "recipe"
    for _ in range(2):  # a recipe folder is replaced by the new one
        code, out, err = run(monkeypatch, capsys, "calibrate", *common(local_model), "--pattern", "2:4",
                             "--calib-windows", "2", "--calib-steps", "1", "--out", str(recipe))  # fmt: skip
        assert code in (0, None), err
    assert sorted(p.name for p in recipe.iterdir()) == ["recipe.json", "tensors.safetensors"]


class Interrupt(Exception):
    pass


def test_a_resumed_eval_never_mixes_runs_calibrated_differently(monkeypatch, capsys, local_model, tmp_path):
    distribution = sys.modules["actsparse.core.distribution"]
    out = tmp_path / "eval.json"
    args = [*common(local_model), "--windows", "3", "--pattern", "8:16", "--criterion", "magnitude",
            "--corrections", "smoothquant", "--out", str(out)]  # fmt: skip
    calls = {"n": 0}
    original = distribution.Totals.add

    def stop_after_two_windows(self, *a):
        calls["n"] += 1
        if calls["n"] > 4:  # 2 windows × (dense + 1 variant)
            raise KeyboardInterrupt
        return original(self, *a)

    monkeypatch.setattr(distribution.Totals, "add", stop_after_two_windows)
    code, _, err = run(monkeypatch, capsys, "eval", *args, "--calib-windows", "1")
    assert code == 130 and "run the same command again" in err
    assert out.with_name("eval.json.partial").exists()
    monkeypatch.setattr(distribution.Totals, "add", original)
    code, _, err = run(monkeypatch, capsys, "eval", *args, "--calib-windows", "4")
    assert code in (0, None), err
    resumed = json.loads(out.read_text())["rows"][1]
    clean_out = tmp_path / "clean.json"
    args[-1] = str(clean_out)
    code, _, err = run(monkeypatch, capsys, "eval", *args, "--calib-windows", "4")
    clean = json.loads(clean_out.read_text())["rows"][1]
    assert resumed["perplexity"] == clean["perplexity"] and resumed["kl_to_dense"] == clean["kl_to_dense"]


def test_a_second_run_on_the_same_output_is_refused(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "eval.json"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.with_name("eval.json.lock").write_text(str(other.pid))
        code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "1",
                           "--pattern", "2:4", "--criterion", "magnitude", "--out", str(out))  # fmt: skip
        assert code == 2 and f"Another actsparse run (process {other.pid}) is writing" in error_line(err)
        assert not out.exists()
    finally:
        other.kill()
        other.wait()
    # Its process gone, the lock is a killed run's: taken over.
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "1",
                       "--pattern", "2:4", "--criterion", "magnitude", "--out", str(out))  # fmt: skip
    assert code in (0, None), err
    assert out.exists() and not out.with_name("eval.json.lock").exists()


def test_results_and_recipes_honour_the_umask(monkeypatch, capsys, local_model, tmp_path):
    previous = os.umask(0o022)
    try:
        out, recipe = tmp_path / "eval.json", tmp_path / "recipe"
        code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "1",
                           "--pattern", "2:4", "--criterion", "magnitude", "--out", str(out))  # fmt: skip
        assert code in (0, None), err
        code, _, err = run(monkeypatch, capsys, "calibrate", *common(local_model), "--pattern", "2:4",
                           "--calib-windows", "2", "--calib-steps", "1", "--out", str(recipe))  # fmt: skip
        assert code in (0, None), err
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(recipe.stat().st_mode) == 0o755
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in recipe.iterdir()} == {
        "recipe.json": "0o644",
        "tensors.safetensors": "0o644",
    }


# ---- a sentence instead of a traceback ----------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--windows", "-1"], "Invalid value for '--windows': Input should be greater than or equal to 0"),
        (
            ["--calib-windows", "-1"],
            "Invalid value for '--calib-windows': Input should be greater than or equal to 1",
        ),
        (
            ["--calib-windows", "0", "--policy", "amber"],
            "'--calib-windows': Input should be greater than or equal to 1",
        ),
        (["--calib-sample", "middle"], "Invalid value for '--calib-sample'"),
        (["--seqlen", "100000"], "longer than the context"),
        (["--tasks", "no_such_task"], "Unknown task 'no_such_task'"),
        (["--out", "."], "is a folder; give the path of a file"),
        (["--calib-dataset", "no-such.txt"], "Text 'no-such.txt' is neither a known dataset"),
        (
            ["--quant-exclude", "nothing_matches"],
            "quant_exclude filter 'nothing_matches' matches no linear layer",
        ),
        (["--steps", "2"], "No such option: --steps"),
        (["--lr", "1e-3,fast"], "--lr '1e-3,fast' is not a learning rate; give a number (1e-3)"),
        (["--lr", "1e-3,0"], "Learning rate 0 must be positive"),
    ],
)
def test_bad_values_end_in_one_line_before_any_work(
    monkeypatch, capsys, local_model, tmp_path, extra, message
):
    before = files_under(tmp_path)
    code, _, err = run(
        monkeypatch, capsys, "eval", *common(local_model), "--out", str(tmp_path / "r.json"), *extra
    )
    assert code == 2
    assert message in error_line(err)
    assert files_under(tmp_path) == before


def test_the_context_limit_is_named(monkeypatch, capsys, local_model):
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model, seqlen="100000"))
    assert code == 2 and "(128 tokens); lower --seqlen" in error_line(err) and "Loading" not in err


def test_a_model_folder_with_a_broken_config_is_refused(monkeypatch, capsys, local_model):
    model, _ = local_model
    (model / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = run(monkeypatch, capsys, "info", "--model", str(model))
    assert code == 2 and "could not be read" in error_line(err)


def test_a_binary_file_is_not_a_text(monkeypatch, capsys, local_model, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    model, _ = local_model
    code, _, err = run(monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(binary))
    assert code == 2 and "is not a UTF-8 text file" in error_line(err)


@pytest.fixture
def recipe_folder(llama, tmp_path):
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    config = SparsityConfig(pattern="2:4", corrections="smoothquant+learnable")
    from actsparse.config import CalibrationSettings

    handle = sparsify(llama, config, calibration, calibration_settings=CalibrationSettings(steps=1))
    handle.recipe().save(tmp_path / "recipe")
    handle.remove()
    return tmp_path / "recipe"


def test_a_recipe_json_that_is_not_utf8_is_refused(recipe_folder):
    from actsparse import ActsparseError, load_recipe

    (recipe_folder / "recipe.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ActsparseError, match="recipe.json is corrupted"):
        load_recipe(recipe_folder)


def test_a_recipe_tensor_of_the_wrong_shape_is_refused(llama, recipe_folder):
    from actsparse import ActsparseError, load_recipe

    recipe = load_recipe(recipe_folder)
    name = next(n for n in recipe.tensors if n.endswith("mlp.down_proj.input_max"))
    recipe.tensors[name] = recipe.tensors[name][:-1]
    recipe.save(recipe_folder)  # a matching checksum: only the shape is wrong
    with pytest.raises(ActsparseError, match=r"has shape \(127,\) where the layer needs \(128,\)"):
        sparsify(llama, recipe=load_recipe(recipe_folder))


@pytest.mark.parametrize("damage", [b"[]", b"\x00\x01binary", b'{"key": '])
def test_a_damaged_checkpoint_is_ignored(monkeypatch, capsys, local_model, tmp_path, damage):
    out = tmp_path / "eval.json"
    out.with_name("eval.json.partial").write_bytes(damage)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "1", "--pattern", "2:4",
                       "--criterion", "magnitude", "--out", str(out))  # fmt: skip
    assert code in (0, None), err
    assert json.loads(out.read_text())["rows"][1]["label"] == "2:4 magnitude"


def test_a_truncated_sweep_manifest_names_the_file_to_delete(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text('{"model": ')
    code, _, err = run(monkeypatch, capsys, "sweep", *common(local_model), "--windows", "1", "--pattern", "2:4",
                       "--criterion", "magnitude", "--out", str(out))  # fmt: skip
    assert (
        code == 2 and f"{out / 'sweep.json'} is damaged" in error_line(err) and "delete it" in error_line(err)
    )


def test_an_unknown_task_is_refused_before_any_evaluation(monkeypatch, capsys, local_model, tmp_path):
    code, out, err = run(
        monkeypatch, capsys, "eval", *common(local_model), "--tasks", "lastword,no_such_task"
    )
    assert code == 2 and "Unknown task 'no_such_task'" in error_line(err)
    assert "Loading" not in err and "evaluating" not in err


def test_ctrl_c_says_the_run_can_be_resumed(monkeypatch, capsys, local_model):
    import actsparse.cli.options

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(actsparse.cli.options, "load_model", interrupted)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model))
    assert code == 130 and "interrupted" in err and "run the same command again" in err


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--device", "gpu"], "Unknown device 'gpu'"),
        (["--device", "cpu", "--device-map", "auto"], "give one of them"),
        (["--device-map", "everywhere"], "Unknown device map"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda:0"], "no CUDA GPU")]),
)
def test_a_device_that_is_not_here_is_refused_before_any_work(
    monkeypatch, capsys, local_model, tmp_path, options, words
):
    out = tmp_path / "eval.json"
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--out", str(out), *options)
    assert code == 2 and words in error_line(err)
    assert not out.exists() and not list(tmp_path.glob("eval.json*"))


def test_eval_runs_on_the_named_device_in_batches(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "eval.json"
    args = [*common(local_model), "--windows", "3", "--pattern", "8:16", "--criterion", "amber"]
    code, _, _ = run(
        monkeypatch, capsys, "eval", *args, "--out", str(out), "--device", "cpu", "--batch-size", "2"
    )
    assert code in (0, None)
    batched = json.loads(out.read_text())["rows"]
    code, _, _ = run(monkeypatch, capsys, "eval", *args, "--out", str(out))
    single = json.loads(out.read_text())["rows"]
    assert [r["kl_to_dense"] for r in batched] == pytest.approx(
        [r["kl_to_dense"] for r in single], rel=1e-4, abs=1e-7
    )
