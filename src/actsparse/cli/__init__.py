"""The ``actsparse`` command: parses, calls the API, prints. User mistakes exit 2 with one sentence."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer import Abort
from typer._click.exceptions import ClickException  # typer vendors click; its errors derive from this

from actsparse.calibration.measure import Measurements
from actsparse.config import (
    CalibrationSettings,
    SparsityConfig,
    check_plan_size,
    config_settings,
    configs_from_settings,
)
from actsparse.core.cpu import measure_verdict
from actsparse.core.devices import check_device_map, resolve_device
from actsparse.core.errors import ActsparseError
from actsparse.core.paths import (
    check_file_target,
    check_replaceable,
    check_writable,
    output_lock,
    write_json_atomic,
    write_text_atomic,
)
from actsparse.eval.evaluate import (
    EvalRow,
    evaluate,
    provenance,
    provenance_line,
    quality_table,
    results_document,
)
from actsparse.eval.flops import flop_report
from actsparse.eval.generate import evaluate_generation
from actsparse.eval.sweep import (
    SweepData,
    local_evaluations,
    ray_evaluations,
    read_sweep_file,
    run_sweep,
    sweep_table,
)
from actsparse.eval.tasks import check_tasks, evaluate_tasks
from actsparse.eval.variants import (
    Variant,
    parse_variant,
    prepare_variants,
    read_variants,
    unique_variants,
    weight_variants,
)
from actsparse.io.models import (
    DTYPES,
    EMBEDDED_MODELS,
    check_context,
    converted_dir,
    load_model,
    model_skeleton,
    resolve_dtype,
    resolve_model,
)
from actsparse.io.recipe import Recipe, check_recipe_target, load_recipe
from actsparse.io.text import (
    WindowSample,
    calibration_text,
    calibration_windows,
    evaluation_text,
    token_windows,
)
from actsparse.pieces.base import BACKENDS
from actsparse.pieces.policies import least_cost_by_share
from actsparse.pipeline.phases import insert, measure_sensitivity, plan, sparsify
from actsparse.sparse.targets import target_layers

app = typer.Typer(
    help="Post-training N:M activation sparsity for Hugging Face causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables are wider than the 80 columns rich assumes when the output is a file or a pipe.
console = Console() if sys.stdout.isatty() else Console(width=120)
errors = Console(stderr=True)

ModelOpt = Annotated[
    str, typer.Option(help="Embedded name (see `actsparse models`), Hub id, model folder or .gguf file.")
]
DatasetOpt = Annotated[
    str,
    typer.Option(
        help="sotu, emails, wikitext2, or a text file (a file's first quarter is its calibration split, the rest its evaluation split)."
    ),
]
CalibDatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="Text that calibrates: sotu, emails, wikitext2 (their calibration splits) or another text file (used whole); default: the calibration split of --dataset."
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="float32, bfloat16, float16, or auto: bfloat16 where the device computes it fast (CUDA; "
        "a CPU with AMX or AVX512-BF16), float32 elsewhere."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(help="auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps."),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        help="Spread a model too large for one device with accelerate: auto, balanced, balanced_low_0 "
        "or sequential (layers over the GPUs, the rest in CPU memory, then on disk in the actsparse cache)."
    ),
]
BatchSizeOpt = Annotated[
    int,
    typer.Option(
        min=1,
        help="Windows per forward pass (evaluation and calibration statistics); memory grows with "
        "batch × seqlen × vocabulary.",
    ),
]
SeqlenOpt = Annotated[int, typer.Option(min=2, help="Tokens per window, BOS included.")]
CalibWindowsOpt = Annotated[
    int,
    typer.Option(
        min=1, help="Calibration windows for policies, smoothing, learnable corrections, Wanda, SparseGPT."
    ),
]
CalibSampleOpt = Annotated[
    WindowSample,
    typer.Option(
        help="Which windows --calib-windows takes of the calibration text: spread (evenly from its start "
        "to its end) or start (its first windows).",
    ),
]
CalibStepsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Learnable corrections: optimiser steps (per block for the block objectives; default: one pass "
        "over the fitted windows for those, two for output-kl).",
    ),
]
HoldoutOpt = Annotated[
    float,
    typer.Option(
        "--calib-holdout",
        help="Learnable corrections: share of the calibration windows held out of the fit to judge it; "
        "the corrections are kept as they were where the objective on them was least (0: judge on the fitted windows).",
    ),
]
LrOpt = Annotated[
    str | None,
    typer.Option(
        metavar="LR[,LR...]",
        help="Learnable corrections: peak AdamW learning rate (default: 5e-3 for the block objectives, 1e-3 for output-kl, 1e-4 for it with learn=input+output); "
        "several comma-separated rates (1e-3,1e-4) search: each is fitted and the fit best on the held-out calibration windows kept.",
    ),
]


@dataclass(frozen=True)
class ConfigOptions:
    """The config settings a command was given on its command line, over the command's defaults."""

    given: dict[str, Any]
    defaults: dict[str, Any]
    command: str

    def configs(self) -> list[SparsityConfig]:
        """Every configuration of the cross product of the settings' comma-separated values."""
        return configs_from_settings({**self.defaults, **self.given})

    def one(self) -> SparsityConfig:
        """The one configuration a command describes; several values are refused."""
        configs = self.configs()
        if len(configs) != 1:
            raise ActsparseError(
                f"`actsparse {self.command}` describes one configuration; give one value per setting "
                f"(these settings give {len(configs)})."
            )
        return configs[0]


def config_options(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per ``SparsityConfig`` setting (its pieces' settings included),
    named as the setting, from the one definition in ``actsparse.config.config_settings``; the
    command receives them as ``config: ConfigOptions``. ``defaults`` are the command's own."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        settings = config_settings()
        signature = inspect.signature(command, eval_str=True)
        parameters = [p for p in signature.parameters.values() if p.name != "config"]
        for setting in settings:
            default = defaults.get(setting.name, setting.default)
            shown = ", ".join(default) if isinstance(default, tuple) else default
            help = setting.help
            if setting.owners:
                help = f"{help.rstrip('.')} (setting of {' and '.join(setting.owners)})."
            option = typer.Option(
                f"--{setting.name.replace('_', '-')}", help=f"{help} Default: {shown or 'none'}."
            )
            kind = list[str] | None if setting.repeatable else str | None
            parameters.append(
                inspect.Parameter(
                    setting.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[kind, option],
                )
            )

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {s.name: kwargs.pop(s.name) for s in settings}
            given = {name: value for name, value in values.items() if value is not None}
            return command(
                config=ConfigOptions(given, defaults, command.__name__.removesuffix("_command")), **kwargs
            )

        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _calibration_settings(steps: int | None, lr: str | None, holdout: float) -> CalibrationSettings:
    """The calibration settings of ``--calib-steps``, ``--lr`` (one rate or comma-separated rates)
    and ``--calib-holdout``."""
    try:
        rates = tuple(float(rate) for rate in _split(lr)) if lr is not None else None
    except ValueError:
        raise ActsparseError(
            f"--lr '{lr}' is not a learning rate; give a number (1e-3) or comma-separated numbers (1e-3,1e-4)."
        ) from None
    return CalibrationSettings(steps=steps, lr=rates, holdout=holdout)


def _check_file_outputs(*paths: Path | None) -> None:
    """Refuse, before any work, an output file path where a folder is, in a folder that cannot be
    written, or given for two outputs."""
    given = [path for path in paths if path is not None]
    for path in given:
        check_file_target(path)
        check_writable(path)
    for index, path in enumerate(given):
        if any(path.resolve() == other.resolve() for other in given[:index]):
            raise ActsparseError(
                f"{path} is given for two outputs (--out and --markdown), so one would overwrite the "
                "other; give each its own path."
            )


def _check_backends(variants: list[Variant], dtype: str, device: str) -> str:
    """Refuse, before the model loads, a backend that cannot compute the model in ``dtype`` (or
    ``auto``'s choice) on ``device``; the dtype the model will load in."""
    dtype = resolve_dtype(dtype, device)
    for variant in variants:
        sparsity = variant.config if isinstance(variant, Recipe) else variant
        if isinstance(sparsity, SparsityConfig):
            backend = BACKENDS.get(sparsity.backend)
            if refusal := backend.dtype_refusal(DTYPES[dtype], resolve_device(device)):
                raise ActsparseError(refusal)
    return dtype


def _variants(
    config: ConfigOptions, variant: list[str], variants: Path | None, recipes: list[Path], weights: str
) -> list[Variant]:
    """What `eval` compares with dense: --variant/--variants/--recipe, else the cross product of the
    settings, plus weight pruning at each of its N:M patterns; each variant once, at most
    ``MAX_CONFIGURATIONS`` of them."""
    found: list[Variant] = [v for spec in variant for v in parse_variant(spec, config.given)]
    if variants is not None:
        found += read_variants(variants, config.given)
    folders: dict[Path, Path] = {}  # a folder given twice is loaded once
    for folder in recipes:
        folders.setdefault(folder.resolve(), folder)
    for folder in folders.values():
        recipe = load_recipe(folder)
        found.append(recipe.with_backend(config.given["backend"]) if "backend" in config.given else recipe)
    if found:
        check_plan_size(len(found))
        return unique_variants(found)
    configs: list[Variant] = list(config.configs())
    patterns = [c.pattern for c in configs if not (c.parsed_pattern.unstructured or c.parsed_pattern.dense)]
    return configs + weight_variants(_split(weights), list(dict.fromkeys(patterns)), config.given)


def _recipe_origins(rows: list[EvalRow]) -> list[str]:
    """For each row read from a recipe that says how it was made: its calibration text and the
    machine, date, commit and command that made it."""
    lines = []
    for row in rows:
        calibration = (row.config or {}).get("calibration") or {}
        made, text = calibration.get("provenance"), calibration.get("text")
        if made and text:
            lines.append(
                f"{row.label}: a recipe calibrated on {text['source']} {text['split']} ({text['part']}; "
                f"{text['windows']} windows × {text['seqlen']} tokens, {text['sample']}). "
                + provenance_line(made, "Made")
            )
    return lines


@app.command("eval")
@config_options(pattern="2:4,8:16,16:32", criterion="magnitude,amber")
def eval_command(
    config: ConfigOptions,
    model: ModelOpt = "smollm2-135m",
    weights: Annotated[
        str,
        typer.Option(
            help="Also prune weights at each N:M pattern: comma-separated magnitude, wanda, sparsegpt."
        ),
    ] = "",
    variant: Annotated[
        list[str],
        typer.Option(help="Exact variant, e.g. 'pattern=8:16 criterion=amber quant=w8a8' (repeatable)."),
    ] = [],
    variants: Annotated[Path | None, typer.Option(help="File with one variant per line.")] = None,
    recipe: Annotated[
        list[Path], typer.Option(help="Recipe folder written by `actsparse calibrate` (repeatable).")
    ] = [],
    dataset: DatasetOpt = "sotu",
    calib_dataset: CalibDatasetOpt = None,
    seqlen: SeqlenOpt = 512,
    windows: Annotated[
        int, typer.Option(min=0, help="Number of windows to evaluate; 0 for the whole split.")
    ] = 32,
    calib_windows: CalibWindowsOpt = 16,
    calib_sample: CalibSampleOpt = "spread",
    calib_steps: CalibStepsOpt = None,
    lr: LrOpt = None,
    calib_holdout: HoldoutOpt = 0.25,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    batch_size: BatchSizeOpt = 1,
    out: Annotated[Path, typer.Option(help="JSON file for every figure (written atomically).")] = Path(
        "results/eval.json"
    ),
    markdown: Annotated[Path | None, typer.Option(help="Also write the table as Markdown here.")] = None,
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated lm-eval tasks: mmlu and lastword work offline, any other lm-eval name too."
        ),
    ] = "",
    limit: Annotated[int | None, typer.Option(min=1, help="Examples per task (lm-eval --limit).")] = None,
    task_dir: Annotated[
        Path | None, typer.Option(help="Folder of lm-eval YAML task definitions, e.g. reading local files.")
    ] = None,
    generate: Annotated[
        int,
        typer.Option(
            min=0, help="Prompts (cut from the evaluation text) for generation agreement; 0 skips it."
        ),
    ] = 0,
    prompt_tokens: Annotated[
        int, typer.Option(min=2, help="Tokens per generation prompt, BOS included.")
    ] = 128,
    new_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens generated per prompt.")] = 32,
    layer_details: Annotated[
        bool,
        typer.Option(help="Also save each layer's FLOP accounting and measured sensitivity in the JSON."),
    ] = False,
) -> None:
    """Perplexity, KL to dense and top-1 agreement of the dense model and every variant; with
    --tasks, zero-shot accuracy through lm-eval; with --generate, agreement of greedy continuations.

    Without --variant/--variants/--recipe: the cross product of every setting's comma-separated
    values (pattern × criterion × policy × mitigation × ...), plus weight pruning per pattern.
    Each variant is prepared (measured, calibrated) once and serves perplexity, tasks and generation.
    """
    settings = _calibration_settings(calib_steps, lr, calib_holdout)
    configs = _variants(config, variant, variants, recipe, weights)
    task_names = _split(tasks)
    if task_names or task_dir is not None:
        check_tasks(task_names, task_dir)
    _check_file_outputs(out, markdown)
    evaluation, part = evaluation_text(dataset), calibration_text(dataset, calib_dataset)
    dtype = _check_backends(configs, dtype, device)
    with output_lock(out):
        text = evaluation.text()
        longest = max(seqlen, prompt_tokens + new_tokens if generate else 0)
        loaded, tokenizer = load_model(model, dtype, longest, device, device_map)
        tokens = token_windows(tokenizer, text, seqlen, windows or None)
        calibration, calibrated_by = None, None
        if any(c.needs_calibration for c in configs):
            calibration, calibrated_by = calibration_windows(
                tokenizer, part, seqlen, calib_windows, calib_sample
            )
        handles = prepare_variants(loaded, configs, calibration, settings, batch_size=batch_size)
        # An interrupted run leaves its totals beside --out until the results are saved; the same
        # command resumes from them.
        checkpoint = out.with_name(out.name + ".partial")
        rows = evaluate(loaded, tokens, handles, calibration, checkpoint=checkpoint,
                        calibration_settings=settings, batch_size=batch_size)  # fmt: skip
        if task_names:
            results = evaluate_tasks(
                loaded, tokenizer, handles, task_names, text, limit, task_dir, max(batch_size, 8)
            )
            rows = [replace(row, tasks=result) for row, result in zip(rows, results)]
        if generate:
            prompts = token_windows(tokenizer, text, prompt_tokens, generate)
            agreements = evaluate_generation(loaded, handles, prompts, new_tokens)
            rows[1:] = [replace(row, generation=a.to_dict()) for row, a in zip(rows[1:], agreements)]
        text_info = evaluation.describe() | {
            "seqlen": seqlen,
            "windows": len(tokens),
            "tokens": tokens.numel(),
            "calibration_windows": 0 if calibration is None else len(calibration),
            "calibration_text": calibrated_by,
        }
        document = results_document(rows, model, dtype, text_info, layer_details)
        write_json_atomic(out, document)
        table = quality_table(
            rows,
            f"{model} in {dtype}, {dataset} evaluation split, {len(tokens)} windows × {seqlen} tokens",
            provenance_line(document["provenance"]),
        )
        if markdown is not None:
            write_text_atomic(markdown, table.markdown())
        checkpoint.unlink(missing_ok=True)
    console.print(table.rich())
    console.print(
        "ppl: perplexity; KL: mean KL(dense ‖ sparse) per token; top-1: agreement with the dense model's "
        "next token; sparse FLOPs: share of linear FLOPs (LM head excluded) with sparse inputs (or sparse "
        "weights); density: measured share of non-zero inputs (or weights); removed: share of linear FLOPs removed; "
        "prepared in: time to measure and calibrate the variant (shown when one took a second or more)."
    )
    for line in _recipe_origins(rows):
        console.print(line)
    console.print(f"Saved to {out}")


@app.command()
@config_options(mitigation="learnable")
def calibrate(
    config: ConfigOptions,
    out: Annotated[Path, typer.Option(help="Recipe folder to write (replaced atomically).")],
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "sotu",
    calib_dataset: CalibDatasetOpt = None,
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 32,
    calib_sample: CalibSampleOpt = "spread",
    calib_steps: CalibStepsOpt = None,
    lr: LrOpt = None,
    calib_holdout: HoldoutOpt = 0.25,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    batch_size: BatchSizeOpt = 1,
) -> None:
    """Calibrate one configuration on the calibration text and save it as a recipe folder.

    Learnable corrections are fitted (by their objective); policies and smoothing are measured. Evaluate
    the result with `actsparse eval --recipe DIR`; in Python, `sparsify(model, recipe=load_recipe(DIR))`.
    """
    sparsity = config.one()
    dtype = _check_backends([sparsity], dtype, device)
    settings = _calibration_settings(calib_steps, lr, calib_holdout)
    check_recipe_target(out)
    part = calibration_text(dataset, calib_dataset)
    with output_lock(out):
        loaded, tokenizer = load_model(model, dtype, seqlen, device, device_map)
        calibration, text = calibration_windows(tokenizer, part, seqlen, calib_windows, calib_sample)
        measurements = Measurements(calibration, batch_size)
        start = time.perf_counter()
        handle = sparsify(loaded, sparsity, calibration_settings=settings, measurements=measurements)
        seconds = round(time.perf_counter() - start, 1)
        recipe = handle.recipe()
        made = {"text": text, "seconds": seconds, "provenance": provenance()}
        recipe = replace(recipe, calibration=(recipe.calibration or {}) | made)
        recipe.save(out)
    blocks = (handle.calibration or {}).get("blocks", [])
    if blocks:
        table = Table(
            title=f"{model}: {handle.label}, calibration objective on the held-out calibration windows"
        )
        searched = len(settings.rates) > 1
        columns = ["block", "before", "after", "change", "kept at step"]
        if searched:
            columns.append("least at each rate")
        for column in columns:
            table.add_column(column, justify="left" if column == "block" else "right", no_wrap=True)
        for block in blocks:
            before, after = block["loss_before"], block["loss_after"]
            change = f"{after / before - 1:+.1%}" if before else "–"
            kept = f"{block['kept_step']} of {block['steps']}" if block["kept_step"] else "none kept"
            row = [block["block"], f"{before:.4g}", f"{after:.4g}", change, kept]
            if searched:
                row[-1] += f" at lr {block['lr']:g}" if block["kept_step"] else ""
                row.append(", ".join(f"{lr:g}: {'diverged' if least is None else f'{least:.4g}'}"
                                     for lr, least in block["by_rate"]))  # fmt: skip
            table.add_row(*row)
        console.print(table)
    console.print(
        f"Recipe for {handle.label} saved to {out}; evaluate it with `actsparse eval --recipe {out}`."
    )


@app.command()
@config_options(pattern="2:4,4:8,8:16,16:32,unstructured:0.5", criterion="magnitude,amber")
def sweep(
    config: ConfigOptions,
    model: ModelOpt = "smollm2-135m",
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML file mapping setting names (pattern, criterion, mitigation, policy, ...) to values or lists.",
        ),
    ] = None,
    dataset: DatasetOpt = "sotu",
    calib_dataset: CalibDatasetOpt = None,
    seqlen: SeqlenOpt = 512,
    windows: Annotated[
        int, typer.Option(min=0, help="Evaluation windows per configuration; 0 for the whole split.")
    ] = 16,
    calib_windows: CalibWindowsOpt = 16,
    calib_sample: CalibSampleOpt = "spread",
    calib_steps: CalibStepsOpt = None,
    lr: LrOpt = None,
    calib_holdout: HoldoutOpt = 0.25,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    batch_size: BatchSizeOpt = 1,
    out: Annotated[Path, typer.Option(help="Results directory (resumes a sweep left there).")] = Path(
        "results/sweep"
    ),
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run configurations as Ray tasks on this cluster address ('auto', 'ray://...', or 'local')."
        ),
    ] = None,
    configs_per_pass: Annotated[
        int,
        typer.Option(
            min=0,
            help="Configurations evaluated together against one dense pass per window (0: all); "
            "lower it when their transformed weights do not fit in memory together.",
        ),
    ] = 0,
) -> None:
    """Evaluate the cross product of every setting's values (pattern × criterion × mitigation ×
    policy × ...) against one dense pass per window; an interrupted sweep resumes. Writes JSON per
    configuration, CSV, Markdown and plots.

    Values in --config replace the corresponding options.
    """
    if config_file is not None:
        config = ConfigOptions({**config.given, **read_sweep_file(config_file)}, config.defaults, "sweep")
    configs = config.configs()
    settings = _calibration_settings(calib_steps, lr, calib_holdout)
    dtype = _check_backends(configs, dtype, device)  # the manifest and records name the dtype that ran
    check_device_map(device_map, device)
    data = SweepData(
        model, dataset, seqlen, windows, calib_windows, dtype, calib_dataset, settings,
        device=device, device_map=device_map, batch_size=batch_size, calib_sample=calib_sample,
    )  # fmt: skip
    evaluation_text(dataset)
    calibration_text(dataset, calib_dataset)  # refuses overlapping texts before any work
    check_context(model, seqlen)
    skeleton = model_skeleton(model)
    for sparsity in configs:  # the workers load the model; its layer filters are checked here
        target_layers(skeleton, sparsity)
    check_replaceable(out)  # a file where the sweep's folder would be
    if ray:
        evaluations = ray_evaluations(ray, data)
    else:  # an interrupted group's running totals wait in the sweep's folder
        evaluations = local_evaluations(data, out / "group.partial.json", configs_per_pass)
    with output_lock(out):
        records = run_sweep(configs, out, data, evaluations)
    console.print(sweep_table(records, data.describe()).rich())
    console.print(
        "I/O: bytes of a compressed 512 × 4096 activation tile (values and index) over dense bytes."
    )
    console.print(
        f"Saved to {out}: configs/*.json, sweep.csv, sweep.md, quality_vs_pattern.png, quality_vs_flops.png"
    )


SENSITIVITY_SHARES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
"""The FLOP shares ``actsparse sensitivity`` reports the least summed cost at."""


@app.command()
@config_options()
def sensitivity(
    config: ConfigOptions,
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "sotu",
    calib_dataset: CalibDatasetOpt = None,
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 16,
    calib_sample: CalibSampleOpt = "spread",
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    batch_size: BatchSizeOpt = 1,
    out: Annotated[Path, typer.Option(help="JSON file of the sensitivities.")] = Path(
        "results/sensitivity.json"
    ),
) -> None:
    """Every target layer sparsified alone, most costly first, by what the policy ranks: the relative
    output error ‖Y − Y'‖/‖Y‖, or the model's output KL under --policy kl; then, for each FLOP
    share, the least summed cost of layers reaching it (the layers the budget or kl policy chooses)."""
    sparsity = config.one()
    dtype = _check_backends([sparsity], dtype, device)
    _check_file_outputs(out)
    part = calibration_text(dataset, calib_dataset)
    with output_lock(out):
        loaded, tokenizer = load_model(model, dtype, seqlen, device, device_map)
        calibration, calibrated_by = calibration_windows(tokenizer, part, seqlen, calib_windows, calib_sample)
        costs, choice = measure_sensitivity(loaded, sparsity, calibration, batch_size)
        ranked = sorted(costs.items(), key=lambda kv: -kv[1])
        by_share = least_cost_by_share(costs, choice.flops, choice.total_flops, SENSITIVITY_SHARES)
        write_json_atomic(
            out,
            {
                "model": model,
                "config": sparsity.to_dict(),
                "calibration_text": calibrated_by,
                "calibration_windows": len(calibration),
                "cost": sparsity.policy.cost_name,
                "sensitivity": dict(ranked),
                "least_cost_by_share": by_share,
            },
        )
    cost = sparsity.policy.cost_name
    table = Table(title=f"{model}: sensitivity to {sparsity.label} ({len(calibration)} calibration windows)")
    for column, justify in (("rank", "right"), ("layer", "left"), (cost, "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for rank, (name, value) in enumerate(ranked, 1):
        table.add_row(str(rank), name, f"{value:.4f}")
    console.print(table)
    shares = Table(
        title=f"Least summed {cost} of the layers reaching each share of linear FLOPs (each alone)"
    )
    for column in ("flop share", "sparse FLOPs", "layers", f"summed {cost}"):
        shares.add_column(column, justify="right", no_wrap=True)
    for row in by_share:
        shares.add_row(
            f"{row['flop_share']:.0%}",
            f"{row['sparse_flop_share']:.1%}",
            str(row["layers"]),
            f"{row['summed_cost']:.4f}",
        )
    console.print(shares)
    console.print(f"Saved to {out}")


@app.command()
@config_options()
def info(
    config: ConfigOptions,
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "sotu",
    calib_dataset: CalibDatasetOpt = None,
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 16,
    calib_sample: CalibSampleOpt = "spread",
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
) -> None:
    """The layers a configuration would sparsify, the share of linear FLOPs it makes sparse, and how
    the sparse calls are computed (planned and inserted; nothing is learned)."""
    sparsity = config.one()
    dtype = _check_backends([sparsity], dtype, device)
    part = calibration_text(dataset, calib_dataset)
    loaded, tokenizer = load_model(model, dtype, seqlen, device, device_map)
    calibration = None
    if sparsity.needs_calibration:
        calibration, _ = calibration_windows(tokenizer, part, seqlen, calib_windows, calib_sample)
    candidates = target_layers(loaded, sparsity)
    handle = insert(
        loaded, sparsity, candidates, plan(loaded, sparsity, candidates, Measurements(calibration))
    )
    report = flop_report(loaded, handle)
    table = Table(title=f"{model}: {sparsity.label}, phase {sparsity.phase}")
    table.add_column("layer", no_wrap=True)
    for column in ("in", "out", "MFLOPs/token", "sparse", "density"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in report.layers:
        table.add_row(
            layer.name,
            str(layer.in_features),
            str(layer.out_features),
            f"{layer.flops_per_token / 1e6:.2f}",
            "yes" if layer.sparse else "no",
            f"{layer.nominal_density:.3f}",
        )
    console.print(table)
    console.print(
        f"Sparse share of linear FLOPs: {report.sparse_share:.1%} (LM head excluded; "
        f"{report.sparse_share_with_lm_head:.1%} with the LM head of {report.lm_head_flops_per_token / 1e6:.1f} MFLOPs/token). "
        f"FLOPs removed at this density: {report.removed_share:.1%}."
    )
    console.print(f"Execution: {BACKENDS.get(sparsity.backend).execution(list(handle.layers.values()))}")
    packed = [layer for layer in handle.layers.values() if layer.state(layer.backend) is not None]
    if sparsity.backend == "cpu-kernel" and packed:
        # The verdict is timed on the largest sparse layer's shape, in the model's dtype.
        largest = max(packed, key=lambda layer: layer.in_features * layer.out_features)
        n, m = largest.pattern.keep_count(largest.in_features)
        with console.status("Timing the cpu-kernel layer against the dense products on this CPU"):
            verdict = measure_verdict(
                largest.in_features, largest.out_features, n, m, largest.weight.dtype
            )
        console.print(f"Speed: {verdict.sentence()}")


@app.command()
def models() -> None:
    """The models that ship inside PyPI packages and work offline."""
    table = Table(title="Embedded models")
    for column in ("name", "model", "package", "converted"):
        table.add_column(column)
    for m in EMBEDDED_MODELS.values():
        converted = (converted_dir(m.name) / "config.json").exists()
        table.add_row(m.name, m.description, m.package, "yes" if converted else "on first use")
    console.print(table)


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
        console.print(f"text {name}: ready")
    for name in model:
        console.print(f"model {name}: ready in {resolve_model(name)}")


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
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ClickException as error:  # a bad option value, an unknown option, a missing one
        errors.print(f"[bold red]error:[/] {error.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Abort):
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit status 130
        errors.print(INTERRUPTED, soft_wrap=True)
    sys.exit(code or 0)
