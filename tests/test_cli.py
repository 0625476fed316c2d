"""User mistakes on the command line: one sentence on stderr, exit status 2, no traceback."""

import json
import sys

import pytest
import torch

from actsparse import kernels
from actsparse.cli import main
from actsparse.core import cpu


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["actsparse", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--pattern", "4:2"], "Pattern '4:2' keeps 4 of 2"),
        (["eval", "--criterion", "topk"], "Unknown criterion 'topk'"),
        (["eval", "--model", "./missing-model"], "Model './missing-model' was not found"),
        (["eval", "--phase", "decode"], "Unknown phase 'decode'"),
        (["info", "--model", "./missing-model"], "was not found"),
        (["info", "--pattern", "2:4,8:16"], "describes one configuration"),
        (["eval", "--pattern", ","], "Setting pattern is empty"),
        (["eval", "--variant", "pattern=8:16 colour=red"], "Unknown setting(s) colour"),
        (["eval", "--weights", "obs"], "Unknown weight-pruning method 'obs'"),
        (["eval", "--variants", "no-such-file.txt"], "Variants file 'no-such-file.txt' does not exist"),
        (["eval", "--policy", "greedy"], "Unknown policy 'greedy'"),
        (["eval", "--corrections", "shift+learn"], "Unknown corrections 'shift+learn'"),
        (["eval", "--pattern", "unstructured:0.5", "--backend", "cpu-kernel"], "runs N:M patterns only"),
        (["info", "--backend", "gpu"], "Unknown backend 'gpu'"),
    ],
)
def test_user_errors_exit_2_with_one_sentence(monkeypatch, capsys, args, message):
    code, output = run(monkeypatch, capsys, *args)
    assert code == 2
    assert message in " ".join(output.split())
    assert "Traceback" not in output


def test_models_lists_the_embedded_models(monkeypatch, capsys):
    code, output = run(monkeypatch, capsys, "models")
    assert code in (0, None)
    assert "smollm2-135m" in output and "gemma3-270m" in output


def test_eval_end_to_end_on_a_local_model_and_text(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    variants = tmp_path / "variants.txt"
    variants.write_text(
        "pattern=2:4 criterion=magnitude\npattern=8:16 policy=budget flop_share=0.3\nweights=wanda pattern=2:4\n"
    )
    out, markdown = tmp_path / "r" / "eval.json", tmp_path / "r" / "eval.md"
    code, output = run(
        monkeypatch,
        capsys,
        "eval",
        "--model",
        str(model),
        "--dataset",
        str(text),
        "--seqlen",
        "32",
        "--windows",
        "3",
        "--calib-windows",
        "2",
        "--variants",
        str(variants),
        "--out",
        str(out),
        "--markdown",
        str(markdown),
    )
    assert code in (0, None), output
    rows = json.loads(out.read_text())["rows"]
    assert [r["label"] for r in rows] == [
        "dense",
        "2:4 magnitude",
        "8:16 amber policy=budget flop_share=0.3",
        "weights 2:4 wanda",
    ]
    assert rows[2]["flops"]["sparse_share"] >= 0.3 and rows[2]["config"]["skipped_layers"]
    assert "| weights 2:4 wanda |" in markdown.read_text()
    assert not out.with_name("eval.json.partial").exists()


def test_eval_and_info_with_the_cpu_kernel_backend(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    out = tmp_path / "eval.json"
    common = ["--model", str(model), "--dataset", str(text), "--seqlen", "32"]
    code, output = run(
        monkeypatch,
        capsys,
        "eval",
        *common,
        "--windows",
        "3",
        "--variant",
        "pattern=8:16 criterion=wina",
        "--variant",
        "pattern=8:16 criterion=wina backend=cpu-kernel",
        "--out",
        str(out),
    )
    assert code in (0, None), output
    emulated, kernel = json.loads(out.read_text())["rows"][1:]
    assert kernel["label"] == "8:16 wina cpu-kernel" and kernel["config"]["backend"] == "cpu-kernel"
    assert kernel["perplexity"] == pytest.approx(emulated["perplexity"], rel=1e-4)
    code, output = run(monkeypatch, capsys, "info", *common, "--backend", "cpu-kernel")
    assert code in (0, None), output
    expected = "cpu-kernel: 14 layers" if kernels.AVAILABLE else "although cpu-kernel was asked for"
    assert expected in " ".join(output.split())


def test_corrections_option_expands_to_settings():
    from actsparse.config import configs_from_settings

    settings = {"pattern": "8:16", "corrections": "none,shift+var,smoothquant", "include": ["proj"]}
    configs = configs_from_settings(settings)
    assert [c.label for c in configs] == ["8:16 amber", "8:16 amber shift+var", "8:16 amber smoothquant"]
    assert all(c.include == ("proj",) for c in configs)


def test_sensitivity_ranks_by_what_the_policy_ranks(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    common = ["--model", str(model), "--dataset", str(text), "--seqlen", "32", "--calib-windows", "2"]
    results = {}
    for policy in ("budget", "kl"):
        out = tmp_path / f"{policy}.json"
        code, output = run(
            monkeypatch, capsys, "sensitivity", *common, "--pattern", "2:4", "--policy", policy, "--out", str(out)
        )  # fmt: skip
        assert code in (0, None), output
        results[policy] = json.loads(out.read_text())
        assert "Least summed" in output
    assert results["budget"]["cost"] == "‖Y − Y'‖ / ‖Y‖" and results["kl"]["cost"] == "output KL"
    assert results["kl"]["sensitivity"] != results["budget"]["sensitivity"]
    rows = results["kl"]["least_cost_by_share"]
    assert rows[-1]["flop_share"] == 1.0 and rows[-1]["summed_cost"] == pytest.approx(
        sum(results["kl"]["sensitivity"].values())
    )
    assert [row["summed_cost"] for row in rows] == sorted(row["summed_cost"] for row in rows)


def test_calibrate_writes_a_recipe_that_eval_reads(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    recipe, out = tmp_path / "recipe", tmp_path / "eval.json"
    common = ["--model", str(model), "--dataset", str(text), "--seqlen", "32"]
    code, output = run(
        monkeypatch, capsys, "calibrate", *common, "--pattern", "2:4", "--corrections", "shift+learnable",
        "--objective", "block-mse", "--calib-windows", "3", "--calib-steps", "2", "--lr", "1e-3", "--out", str(recipe),
    )  # fmt: skip
    assert code in (0, None), output
    assert "model.layers.1" in output and (recipe / "tensors.safetensors").exists()
    code, output = run(
        monkeypatch, capsys, "eval", *common, "--windows", "2", "--recipe", str(recipe), "--out", str(out)
    )
    assert code in (0, None), output
    rows = json.loads(out.read_text())["rows"]
    # fitted at 1e-3, not block-mse's 5e-3: the label says so
    assert [r["label"] for r in rows] == ["dense", "2:4 amber shift+learnable objective=block-mse lr=0.001"]
    assert rows[1]["config"]["calibration"]["text"]["windows"] == 3
    assert rows[1]["config"]["calibration"]["text"]["sample"] == "spread"
    every_call = tmp_path / "all.json"
    code, output = run(
        monkeypatch, capsys, "eval", *common, "--windows", "2", "--recipe", str(recipe), "--phase", "all",
        "--out", str(every_call),
    )  # fmt: skip
    assert code in (0, None), output
    [_, row] = json.loads(every_call.read_text())["rows"]
    assert row["config"]["phase"] == "all" and row["kl_to_dense"] == rows[1]["kl_to_dense"]


def test_calibrate_searches_comma_separated_learning_rates(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    recipe = tmp_path / "recipe"
    code, output = run(
        monkeypatch, capsys, "calibrate", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--pattern", "2:4", "--corrections", "learnable", "--calib-windows", "3", "--calib-steps", "2",
        "--lr", "1e-3, 1e-4", "--out", str(recipe),
    )  # fmt: skip
    assert code in (0, None), output
    saved = json.loads((recipe / "recipe.json").read_text())["calibration"]
    assert saved["settings"]["lr"] == [1e-3, 1e-4]
    [fit] = saved["blocks"]
    assert fit["kept_step"] and fit["lr"] in (1e-3, 1e-4)  # the step and rate the fit was kept at
    assert f"{fit['kept_step']} of 2 at lr {fit['lr']:g}" in output
    assert [lr for lr, _ in fit["by_rate"]] == [1e-3, 1e-4]  # each rate's least held-out KL, shown too
    assert ", ".join(f"{lr:g}: {least:.4g}" for lr, least in fit["by_rate"]) in output
    assert "Recipe for 2:4 amber learnable lr=0.001,0.0001 saved to" in " ".join(output.split())


def test_eval_with_a_missing_recipe(monkeypatch, capsys, tmp_path):
    code, output = run(monkeypatch, capsys, "eval", "--recipe", str(tmp_path / "none"))
    assert code == 2 and "is not a recipe folder" in " ".join(output.split()) and "Traceback" not in output


def test_sweep_from_a_yaml_file(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    config = tmp_path / "sweep.yaml"
    config.write_text('pattern: ["2:4", "16:32"]\ncriterion: [magnitude]\nmitigation: "none,shift"\n')
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(model), "--dataset", str(text), "--seqlen", "32", "--windows", "2"]
    code, output = run(monkeypatch, capsys, *args, "--config", str(config), "--out", str(out))
    assert code in (0, None), output
    assert len(list((out / "configs").glob("*.json"))) == 4
    assert (out / "sweep.csv").read_text().count("\n") == 5 and (out / "quality_vs_pattern.png").exists()
    assert "16:32" in output and "I/O: bytes" in " ".join(output.split())


def test_eval_with_tasks_and_generation(monkeypatch, capsys, local_model, tmp_path):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    model, text = local_model
    out, markdown = tmp_path / "eval.json", tmp_path / "eval.md"
    code, output = run(
        monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "40",
        "--windows", "2", "--pattern", "2:4", "--criterion", "magnitude", "--tasks", "lastword", "--limit", "6",
        "--generate", "3", "--prompt-tokens", "16", "--new-tokens", "4", "--out", str(out), "--markdown", str(markdown),
    )  # fmt: skip
    assert code in (0, None), output
    rows = json.loads(out.read_text())["rows"]
    assert [r["tasks"]["lastword"]["n"] for r in rows] == [6, 6]
    assert rows[0]["generation"] is None and rows[1]["generation"]["prompts"] == 3
    assert "lastword acc (n=6)" in markdown.read_text()


def _four_choice_task(folder):
    """A 4-choice lm-eval task in a local YAML file over a local JSONL file."""
    from conftest import WORDS

    data = folder / "four.jsonl"
    rows = [
        {"q": " ".join(WORDS[i : i + 5]), "choices": WORDS[i + 5 : i + 9], "gold": i % 4} for i in range(8)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "four.yaml").write_text(
        "task: four_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n"
    )


def test_eval_passes_task_dir_on_to_lm_eval(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    tasks, out = tmp_path / "tasks", tmp_path / "eval.json"
    tasks.mkdir()
    _four_choice_task(tasks)
    code, output = run(
        monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--windows", "2", "--pattern", "2:4", "--criterion", "magnitude", "--tasks", "four_local",
        "--task-dir", str(tasks), "--out", str(out),
    )  # fmt: skip
    assert code in (0, None), output
    rows = json.loads(out.read_text())["rows"]
    assert [r["tasks"]["four_local"]["n"] for r in rows] == [8, 8]


def test_a_learnable_variant_is_calibrated_once_for_perplexity_tasks_and_generation(
    monkeypatch, capsys, local_model, tmp_path
):
    import actsparse.calibration.fitting

    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    calls = []
    original = actsparse.calibration.fitting.learn_corrections

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(actsparse.calibration.fitting, "learn_corrections", counted)
    model, text = local_model
    out = tmp_path / "eval.json"
    code, output = run(
        monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--windows", "2", "--pattern", "2:4", "--criterion", "magnitude", "--corrections", "learnable",
        "--calib-windows", "2", "--calib-steps", "1", "--tasks", "lastword", "--limit", "4",
        "--generate", "2", "--prompt-tokens", "8", "--new-tokens", "2", "--out", str(out),
    )  # fmt: skip
    assert code in (0, None), output
    assert len(calls) == 1
    row = json.loads(out.read_text())["rows"][1]
    assert row["tasks"]["lastword"]["n"] == 4 and row["generation"]["prompts"] == 2


def test_sensitivities_are_measured_once_per_pattern_criterion_and_corrections(
    monkeypatch, capsys, local_model, tmp_path
):  # not per policy or phase: calibration windows are sparsified alike under both phases
    phases = sys.modules["actsparse.pipeline.phases"]  # the module; `actsparse.pipeline.phases` is the function
    calls = []
    original = phases.layer_sensitivity

    def counted(model, windows, layers, config, statistics=None, batch_size=1):
        calls.append((config.pattern, config.criterion))
        return original(model, windows, layers, config, statistics, batch_size)

    monkeypatch.setattr(phases, "layer_sensitivity", counted)
    model, text = local_model
    code, output = run(
        monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--windows", "1", "--calib-windows", "2", "--pattern", "2:4", "--criterion", "magnitude,amber",
        "--policy", "amber,budget", "--flop-share", "0.3", "--phase", "prefill,all",
        "--out", str(tmp_path / "eval.json"),
    )  # fmt: skip
    assert code in (0, None), output
    assert sorted(calls) == [("2:4", "amber"), ("2:4", "magnitude")]


def test_sweep_hands_the_calibration_settings_to_its_evaluations(monkeypatch, capsys, local_model, tmp_path):
    model, text = local_model
    out = tmp_path / "sweep"
    code, output = run(
        monkeypatch, capsys, "sweep", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--windows", "1", "--calib-windows", "2", "--pattern", "2:4", "--criterion", "magnitude",
        "--corrections", "learnable", "--calib-steps", "1", "--lr", "0.0123", "--out", str(out),
    )  # fmt: skip
    assert code in (0, None), output
    (record,) = [json.loads(p.read_text()) for p in (out / "configs").glob("*.json")]
    assert record["config"]["calibration"]["settings"] == {**record["config"]["calibration"]["settings"],
                                                           "steps": 1, "lr": 0.0123}  # fmt: skip
    assert "first quarter" in record["calibration_text"]["part"]
    assert json.loads((out / "sweep.json").read_text())["calibration"]["settings"]["lr"] == 0.0123


def test_a_local_text_file_never_calibrates_on_its_evaluation_part(
    monkeypatch, capsys, local_model, tmp_path
):
    import actsparse.cli.commands

    seen = {}
    original = actsparse.cli.commands.prepare_variants

    def capture(model, variants, calibration, settings, **options):
        seen["calibration"] = calibration
        return original(model, variants, calibration, settings, **options)

    monkeypatch.setattr(actsparse.cli.commands, "prepare_variants", capture)
    model, text = local_model
    out = tmp_path / "eval.json"
    code, output = run(
        monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
        "--windows", "0", "--pattern", "2:4", "--corrections", "smoothquant", "--calib-windows", "100",
        "--out", str(out),
    )  # fmt: skip
    assert code in (0, None), output
    document = json.loads(out.read_text())
    calibration = document["text"]["calibration_text"]
    assert calibration["source"] == str(text) and "first quarter" in calibration["part"]
    evaluated, calibrated = document["text"]["tokens"], seen["calibration"].numel()
    # The calibration windows come from the first quarter only (the text is 2,000 words, one token each).
    assert calibrated <= 0.3 * 2000 < evaluated


def test_eval_says_which_dtype_ran(monkeypatch, capsys, local_model, tmp_path):
    from actsparse.io.models import resolve_dtype

    model, text = local_model
    out = tmp_path / "eval.json"
    code, output = run(monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
                       "--windows", "2", "--pattern", "8:16", "--dtype", "auto", "--out", str(out))  # fmt: skip
    assert code in (0, None), output
    ran = resolve_dtype("auto")
    assert json.loads(out.read_text())["dtype"] == ran and f"in {ran}," in " ".join(output.split())


@pytest.mark.skipif(not kernels.AVAILABLE, reason="the compiled extension is not built")
@pytest.mark.parametrize("pays", [True, False])
def test_info_prints_the_verdict_of_the_largest_sparse_layer(monkeypatch, capsys, local_model, pays):
    model, text = local_model
    shapes = []

    def timed(in_features, out_features, n, m, dtype, tokens, repeats):
        shapes.append((in_features, out_features, n, m, dtype))
        sparse = 5.0 if pays else 20.0
        return cpu.CallTiming(tokens, sparse, {"F.linear": 10.0}), None

    monkeypatch.setattr(cpu, "time_products", timed)
    code, output = run(monkeypatch, capsys, "info", "--model", str(model), "--dataset", str(text), "--seqlen", "32",
                       "--pattern", "2:4", "--backend", "cpu-kernel")  # fmt: skip
    assert code in (0, None), output
    expected = "cpu-kernel pays on this CPU, in prefill and in decode" if pays else "cpu-kernel does not pay"
    assert f"Speed: {expected}" in " ".join(output.split())
    in_features, out_features, n, m, dtype = shapes[0]
    assert (n, m, dtype) == (2, 4, torch.float32)
    assert in_features * out_features == 64 * 128  # the tiny model's largest projection
