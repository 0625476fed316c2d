"""What a hostile but realistic user meets: nothing lost at the last step, no recipe on the wrong
model, no input that eats the machine. Full and read-only disks are small tmpfs mounts (skipped
where this process cannot mount one); other failures are made by making the write fail."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import SMALL
from test_user_faults import error_line, run
from transformers import LlamaConfig, LlamaForCausalLM

from actsparse import ActsparseError, SparsityConfig, kernels, load_recipe, sparsify
from actsparse import config as config_module
from actsparse.config import CalibrationSettings
from actsparse.core import cpu
from actsparse.io import text as texts


def common(local_model):
    model, text = local_model
    return ["--model", str(model), "--dataset", str(text), "--seqlen", "32"]


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs at ``path`` (full once ``size`` is written, or read-only); skip without mount."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("this process cannot mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def never_load(monkeypatch):
    """Fail the test if a model is loaded: the refusal must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr("actsparse.cli.options.load_model", refuse)


# ---- 1-3: results lost or overwritten ------------------------------------------------------------


def test_a_failed_final_write_keeps_the_finished_evaluation(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", *common(local_model), "--windows", "2", "--pattern", "2:4", "--criterion", "magnitude",
            "--out", str(out)]  # fmt: skip
    import actsparse.cli.commands

    original = actsparse.cli.commands.write_json_atomic

    def disk_full(path, data):
        raise ActsparseError(f"Could not write {path} (No space left on device); free space there.")

    monkeypatch.setattr(actsparse.cli.commands, "write_json_atomic", disk_full)
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 2 and "No space left" in error_line(err)
    partial = json.loads(out.with_name("eval.json.partial").read_text())
    assert partial["windows_done"] == 2  # every window's totals survived

    monkeypatch.setattr(actsparse.cli.commands, "write_json_atomic", original)
    forwards = {"n": 0}
    original_forward = LlamaForCausalLM.forward

    def counting(self, *a, **k):
        forwards["n"] += 1
        return original_forward(self, *a, **k)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counting)
    code, _, err = run(monkeypatch, capsys, *args)
    assert code in (0, None), err
    assert forwards["n"] == 0  # resumed after the last window: nothing evaluated again
    assert json.loads(out.read_text())["rows"][1]["label"] == "2:4 magnitude"
    assert not out.with_name("eval.json.partial").exists()


def test_a_kill_during_generation_keeps_the_finished_evaluation(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "eval.json"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("actsparse.cli.commands.evaluate_generation", killed)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "2", "--pattern", "2:4",
                       "--generate", "1", "--prompt-tokens", "8", "--new-tokens", "2", "--out", str(out))  # fmt: skip
    assert code == 130 and not out.exists()
    assert json.loads(out.with_name("eval.json.partial").read_text())["windows_done"] == 2


def test_markdown_and_out_on_one_path_are_refused_before_any_work(monkeypatch, capsys, local_model, tmp_path):
    never_load(monkeypatch)
    out = tmp_path / "results.json"
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--out", str(out),
                       "--markdown", str(tmp_path / "." / "results.json"))  # fmt: skip
    assert code == 2 and "given for two outputs" in error_line(err) and not out.exists()


def test_an_unwritable_markdown_path_is_refused_before_any_work(monkeypatch, capsys, local_model, tmp_path):
    never_load(monkeypatch)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--out", str(tmp_path / "r.json"),
                       "--markdown", str(afile / "table.md"))  # fmt: skip
    assert code == 2 and "is a file" in error_line(err) and afile.read_text() == "mine"
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--out", str(tmp_path / "r.json"),
                           "--markdown", str(read_only / "table.md"))  # fmt: skip
        assert code == 2 and "cannot be written" in error_line(err)


def test_calibrate_onto_a_full_disk_ends_in_one_sentence(monkeypatch, capsys, local_model, tmp_path):
    with tmpfs(tmp_path / "full", "16k") as full:
        (full / "filler").write_bytes(b"x" * 12 * 1024)
        code, _, err = run(monkeypatch, capsys, "calibrate", *common(local_model), "--pattern", "2:4",
                           "--calib-windows", "2", "--calib-steps", "1", "--out", str(full / "recipe"))  # fmt: skip
        assert code == 2
        assert "Could not write" in error_line(err) and "free space" in error_line(err)
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no scratch folder left


def test_a_full_disk_leaves_no_half_written_file(tmp_path):
    from actsparse.core.paths import write_text_atomic

    with tmpfs(tmp_path / "full", "16k") as full:
        with pytest.raises(ActsparseError, match="No space left on device"):
            write_text_atomic(full / "big.json", "x" * 64 * 1024)
        assert list(full.iterdir()) == []


# ---- 4-6: recipes accepted where they should not be ----------------------------------------------


@pytest.fixture
def recipe(llama, tmp_path):
    calibration = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    handle = sparsify(llama, SparsityConfig(pattern="2:4", corrections="smoothquant+learnable"), calibration,
                      calibration_settings=CalibrationSettings(steps=1))  # fmt: skip
    handle.recipe().save(tmp_path / "recipe")
    handle.remove()
    return tmp_path / "recipe"


def test_a_recipe_is_refused_on_a_model_of_the_same_shapes_with_other_weights(llama, recipe):
    torch.manual_seed(1)
    other = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    with pytest.raises(ActsparseError, match="same layers as this llama .* but with other weights"):
        sparsify(other, recipe=load_recipe(recipe))
    # the same weights in bfloat16 are the same model
    with sparsify(llama.to(torch.bfloat16), recipe=load_recipe(recipe)) as handle:
        assert handle.layers


def test_an_edited_recipe_json_is_refused(recipe):
    description = json.loads((recipe / "recipe.json").read_text())
    description["config"]["pattern"] = "4:64"
    (recipe / "recipe.json").write_text(json.dumps(description))
    with pytest.raises(ActsparseError, match="recipe.json was edited or damaged"):
        load_recipe(recipe)


def test_a_recipe_naming_layers_the_model_lacks_is_refused(llama, recipe):
    loaded = load_recipe(recipe)
    loaded.sparse_layers = [name.replace("layers.1.", "layers.7.") for name in loaded.sparse_layers]
    with pytest.raises(ActsparseError, match=r"has no target layer of \(first: 'model.layers.7"):
        sparsify(llama, recipe=loaded)


# ---- 7-9: inputs that misbehave ---------------------------------------------------------------------


ALIAS_BOMB = """\
include: &a ["q", "q", "q", "q", "q", "q", "q", "q", "q"]
exclude: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
quant_exclude: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
criterion: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
pattern: [*d, *d, *d, *d, *d, *d, *d, *d, *d]
"""
"""370 bytes that, expanded, are 9**5 values per key (the old reader took 47 s and 4.8 GB on less)."""


def test_a_sweep_file_of_nested_aliases_is_refused_before_any_model_loads(
    monkeypatch, capsys, local_model, tmp_path
):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    monkeypatch.setattr("actsparse.cli.commands.model_skeleton", lambda *a: pytest.fail("the model was read"))
    code, _, err = run(monkeypatch, capsys, "sweep", *common(local_model), "--config", str(bomb),
                       "--out", str(tmp_path / "sweep"))  # fmt: skip
    assert code == 2 and "not a nested list or mapping" in error_line(err)
    assert len(err) < 1000 and not (tmp_path / "sweep").exists()


def test_a_plan_beyond_the_bound_is_refused_before_any_configuration_is_built(monkeypatch):
    built = {"n": 0}
    original = SparsityConfig.__post_init__

    def counting(self):
        built["n"] += 1
        original(self)

    monkeypatch.setattr(SparsityConfig, "__post_init__", counting)
    patterns = [f"{n}:64" for n in range(1, 65)]
    with pytest.raises(ActsparseError, match="plan 1,280 configurations, more than the 1,024"):
        config_module.configs_from_settings({"pattern": patterns, "criterion": "magnitude,wina,amber,clact,variance",
                               "phase": "prefill,all", "remainder": "error,dense"})  # fmt: skip
    assert built["n"] == 0


def test_a_variant_given_twice_is_evaluated_once(monkeypatch, capsys, local_model, tmp_path):
    out = tmp_path / "eval.json"
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--windows", "1",
                       "--variant", "pattern=2:4 criterion=magnitude", "--variant", "criterion=magnitude pattern=2:4",
                       "--out", str(out))  # fmt: skip
    assert code in (0, None), err
    assert [row["label"] for row in json.loads(out.read_text())["rows"]] == ["dense", "2:4 magnitude"]


def test_config_values_of_the_wrong_type_are_refused_in_one_sentence(llama):
    with sparsify(llama, SparsityConfig(pattern="2:4", include="q_proj$")) as handle:
        assert list(handle.layers) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    for settings, message in (
        ({"pattern": 8}, "Pattern 8 is a int, not text"),
        ({"criterion": ["amber"]}, "criterion must be a name"),
        ({"exclude": None}, "exclude must be a regular expression or a list of them"),
        ({"corrections": 5}, "corrections must be spelled as text"),
    ):
        with pytest.raises(ActsparseError, match=message):
            SparsityConfig(**settings)


def test_a_variants_file_with_no_variant_is_refused(monkeypatch, capsys, local_model, tmp_path):
    never_load(monkeypatch)
    variants = tmp_path / "variants.txt"
    variants.write_text("# only a comment\n\n   # and another\n")
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--variants", str(variants))
    assert code == 2 and "holds no variant" in error_line(err)


def test_a_setting_repeated_in_one_variant_is_refused(monkeypatch, capsys, local_model, tmp_path):
    never_load(monkeypatch)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--variant", "pattern=2:4 pattern=8:16")
    assert code == 2 and "sets pattern twice" in error_line(err) and "pattern=2:4,8:16" in error_line(err)


def test_a_byte_order_mark_is_not_part_of_the_first_setting(tmp_path):
    from actsparse.eval.variants import read_variants

    variants = tmp_path / "variants.txt"
    variants.write_bytes("\ufeffpattern=2:4 criterion=magnitude\n".encode())
    assert read_variants(variants) == [SparsityConfig(pattern="2:4", criterion="magnitude")]


def test_a_huge_line_is_not_echoed_whole(monkeypatch, capsys, local_model, tmp_path):
    never_load(monkeypatch)
    variants = tmp_path / "variants.txt"
    variants.write_text("pattern=2:4 " + "x" * 1_000_000 + "\n")
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--variants", str(variants))
    assert code == 2 and "is not key=value" in error_line(err) and len(err) < 1000
    variants.write_text("pattern=" + "9" * 1_000_000 + "\n")
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--variants", str(variants))
    assert code == 2 and "is not understood" in error_line(err) and len(err) < 1000


# ---- 10: texts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [" \n\t \n" * 500, "bab bad " * 300 + "\n" + " \n" * 2000])
def test_a_text_of_only_whitespace_is_refused(monkeypatch, capsys, local_model, tmp_path, text):
    never_load(monkeypatch)
    empty = tmp_path / "blank.txt"
    empty.write_text(text)
    model, _ = local_model
    code, _, err = run(monkeypatch, capsys, "eval", "--model", str(model), "--dataset", str(empty))
    assert code == 2 and "whitespace" in error_line(err)


def test_a_long_text_is_tokenized_in_parts_that_bound_the_memory(monkeypatch, local_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model[0])
    text = local_model[1].read_text().replace(". ", ".\n\n")  # paragraphs to cut at
    whole = texts.token_ids(tokenizer, text)
    seen = []
    original = type(tokenizer).__call__

    def recording(self, part, **kwargs):
        seen.append(len(part))
        return original(self, part, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", recording)
    monkeypatch.setattr(texts, "TOKENIZE_CHARS", 1000)
    assert torch.equal(texts.token_ids(tokenizer, text), whole)  # cut at paragraph breaks: the same tokens
    assert len(seen) > 5 and max(seen) <= 1000
    seen.clear()
    first = texts.token_windows(tokenizer, text, 32, 2, "start")  # two windows need only the first part
    assert len(seen) == 1 and torch.equal(first[:, 1:].flatten(), whole[: 2 * 31])


# ---- 11-13: the cache, Hub ids, dtypes -------------------------------------------------------------------


def test_a_cache_that_cannot_be_written_is_named_before_any_conversion(monkeypatch, tmp_path):
    from actsparse.io import models

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("conversion started"))  # fmt: skip
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setenv("ACTSPARSE_CACHE", str(afile / "cache"))
    with pytest.raises(ActsparseError, match="is a file, so nothing can be written under it"):
        models.resolve_model(str(gguf))
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        monkeypatch.setenv("ACTSPARSE_CACHE", str(read_only))
        with pytest.raises(ActsparseError, match="cannot be written .*set ACTSPARSE_CACHE"):
            models.resolve_model(str(gguf))
        from actsparse.io.text import sotu_dir

        with pytest.raises(ActsparseError, match="cannot be written .*set ACTSPARSE_CACHE"):
            sotu_dir()


def test_a_full_cache_ends_in_one_sentence_naming_actsparse_cache(monkeypatch, tmp_path):
    with tmpfs(tmp_path / "full", "16k") as full:
        (full / "filler").write_bytes(b"x" * 15 * 1024)
        monkeypatch.setenv("ACTSPARSE_CACHE", str(full))
        from actsparse.core.paths import atomic_directory, cache_dir

        with pytest.raises(ActsparseError, match="No space left on device.*set ACTSPARSE_CACHE"):
            with atomic_directory(cache_dir() / "models" / "m") as scratch:
                (scratch / "model.safetensors").write_bytes(b"x" * 64 * 1024)
        assert sorted(p.name for p in full.iterdir()) == ["filler", "models"]  # no scratch folder left
        assert list((full / "models").iterdir()) == []


def test_one_segment_hub_ids_are_hub_ids_and_offline_is_one_sentence(monkeypatch, tmp_path):
    from actsparse.io import models

    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert models.resolve_model("gpt2") == "gpt2" and models.resolve_model("openai/gpt2") == "openai/gpt2"
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ActsparseError, match="the Hub .* cannot be reached from here .* connect to the network"):
        models.resolve_model("distilgpt2")


def test_a_dtype_the_cpu_kernel_does_not_compute_is_refused(monkeypatch, capsys, local_model, llama):
    if not kernels.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    never_load(monkeypatch)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--dtype", "float16",
                       "--pattern", "2:4", "--backend", "cpu-kernel", "--device", "cpu")  # fmt: skip
    assert code == 2 and "computes float32 or bfloat16, not float16" in error_line(err)
    with pytest.raises(ActsparseError, match="not float16"):
        sparsify(llama.half(), SparsityConfig(pattern="2:4", backend="cpu-kernel"))


def test_a_one_token_prompt_names_prompt_tokens(monkeypatch, capsys, local_model):
    never_load(monkeypatch)
    code, _, err = run(monkeypatch, capsys, "eval", *common(local_model), "--generate", "1", "--prompt-tokens", "1")
    assert code == 2 and "--prompt-tokens" in error_line(err) and "--seqlen" not in error_line(err)


# ---- 14: a verdict from noisy timings ------------------------------------------------------------------


def test_noisy_timings_give_no_verdict_after_trying_again(monkeypatch):
    if not kernels.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    calls = {"n": 0}

    def noisy(run, repeats):
        calls["n"] += 1
        return [1.0, 1.0, 24.0]  # one repeat 24× the others: the machine is busy

    monkeypatch.setattr(cpu, "timings_ms", noisy)
    monkeypatch.setattr(cpu, "decode_stack_bytes", lambda: 2**20)
    verdict = cpu.measure_verdict(64, 128, 8, 16, repeats=3)
    assert not verdict.trusted and verdict.tries == cpu.VERDICT_TRIES and verdict.spread == 24.0
    text = verdict.sentence()
    assert text.startswith("no verdict: the timings on this CPU varied too much") and "24.00×" in text
    assert "pays" not in text and "for speed" not in text


def test_steady_timings_give_a_verdict_that_states_its_spread(monkeypatch):
    if not kernels.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    monkeypatch.setattr(cpu, "timings_ms", lambda run, repeats: [1.0, 1.1, 1.05])
    monkeypatch.setattr(cpu, "decode_stack_bytes", lambda: 2**20)
    verdict = cpu.measure_verdict(64, 128, 8, 16, repeats=3)
    assert verdict.trusted and verdict.tries == 1
    assert "the slowest repeat of a product took 1.10× its fastest, over 3 repeats" in verdict.sentence()
