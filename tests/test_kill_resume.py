"""Kill ``eval``, ``calibrate`` and ``sweep`` at random points (SIGKILL: no cleanup runs), run the
same command again, and get exactly the results of an uninterrupted run, with nothing changed
outside the output path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

SEEDS = (0, 1)


def command(name, model, text, out):
    common = ["--model", str(model), "--dataset", str(text), "--seqlen", "16"]
    specific = {
        "eval": ["--windows", "0", "--pattern", "2:4,8:16", "--criterion", "magnitude", "--corrections", "none,smoothquant",
                 "--calib-windows", "4"],
        "calibrate": ["--pattern", "2:4", "--corrections", "shift+learnable", "--calib-windows", "8"],
        "sweep": ["--windows", "20", "--pattern", "2:4,4:8,8:16", "--criterion", "magnitude,wina"],
    }[name]  # fmt: skip
    return [sys.executable, "-m", "actsparse", name, *common, *specific, "--out", str(out)]


def results(name, out):
    """What a finished run produced, byte for byte where it is deterministic."""
    if name == "eval":
        document = json.loads(out.read_text())
        for row in document["rows"]:
            row.pop("prepare_seconds")  # a duration, never the same twice
        return document["rows"], document["text"]
    if name == "calibrate":
        recipe = json.loads((out / "recipe.json").read_text())
        recipe["calibration"].pop("seconds")  # a duration, never the same twice
        recipe["calibration"].pop("provenance")  # the command names its own --out
        recipe.pop("recipe_sha256")  # the checksum covers both
        return (out / "tensors.safetensors").read_bytes(), recipe
    return {p.name: p.read_text() for p in sorted((out / "configs").glob("*.json"))}, (
        out / "sweep.csv"
    ).read_text()


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def changed(before, after):
    return {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


def environment(tmp_path):
    return {**os.environ, "ACTSPARSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def run(argv, env, out, kill_after=None):
    """Run ``argv``; its work starts when it takes ``<out>.lock``. Returns how long the work took,
    or, with ``kill_after`` (seconds of work), kills it then with SIGKILL and returns whether it
    was still working."""
    lock = out.with_name(out.name + ".lock")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not lock.exists() and process.poll() is None:
        time.sleep(0.005)
    started = time.monotonic()
    if kill_after is None:
        _, err = process.communicate()
        assert process.returncode == 0, err.decode()[-2000:]
        return time.monotonic() - started
    time.sleep(kill_after)
    working = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return working


@pytest.mark.parametrize("name", ["eval", "calibrate", "sweep"])
def test_a_run_killed_at_random_points_resumes_to_the_same_results(name, local_model, tmp_path):
    model, text = local_model
    env = environment(tmp_path)
    reference_out = tmp_path / "reference" / "out"
    reference_out.parent.mkdir()
    work = run(command(name, model, text, reference_out), env, reference_out)
    expected = results(name, reference_out)
    killed_while_working = 0
    for seed in SEEDS:
        folder = tmp_path / f"run-{seed}"
        folder.mkdir()
        (folder / "unrelated.txt").write_text("not actsparse's")
        out = folder / "out"
        before = snapshot(tmp_path)
        killed_while_working += run(
            command(name, model, text, out), env, out, random.Random(seed).uniform(0.05, 0.75) * work
        )
        finished = subprocess.run(command(name, model, text, out), env=env, capture_output=True, text=True)
        assert finished.returncode == 0, finished.stderr[-2000:]
        assert results(name, out) == expected, f"seed {seed}: resumed results differ"
        outside = {p for p in changed(before, snapshot(tmp_path)) if out not in (p, *p.parents)}
        assert not outside, f"seed {seed}: changed outside the output path: {sorted(map(str, outside))}"
    assert killed_while_working, "every kill landed after its run had finished"
