"""The ``actsparse`` command: parses, calls the API, prints. User mistakes exit 2 with one sentence."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from actsparse import kernels
from actsparse.calibrate import CalibrationSettings
from actsparse.config import DEFAULT_TARGETS, SparsityConfig
from actsparse.data import load_text, token_windows
from actsparse.errors import ActsparseError
from actsparse.evaluate import EvalRow, Variant, evaluate, results_document, results_markdown
from actsparse.flops import flop_report
from actsparse.generate import evaluate_generation
from actsparse.models import EMBEDDED_MODELS, converted_dir, load_model, resolve_model
from actsparse.paths import write_json_atomic, write_text_atomic
from actsparse.policy import layer_sensitivity
from actsparse.recipe import load_recipe
from actsparse.sparsify import SparsityHandle, sparsify, target_layers
from actsparse.sweep import (
    SweepData,
    local_evaluations,
    ray_evaluations,
    read_sweep_file,
    run_sweep,
    sweep_cells,
    sweep_title,
)
from actsparse.tasks import evaluate_tasks
from actsparse.variants import cross_product, mitigation_settings, parse_variant, read_variants

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
PatternOpt = Annotated[
    str, typer.Option(help="Comma-separated patterns: N:M (keep N of every M) or unstructured:<density>.")
]
CriterionOpt = Annotated[
    str, typer.Option(help="Comma-separated criteria: magnitude, wina, amber, clact, variance.")
]
PhaseOpt = Annotated[str, typer.Option(help="prefill: sparsify prompt processing only; all: every call.")]
IncludeOpt = Annotated[list[str], typer.Option(help="Regex on layer names to sparsify (repeatable).")]
ExcludeOpt = Annotated[list[str], typer.Option(help="Regex on layer names to keep dense (repeatable).")]
RemainderOpt = Annotated[
    str, typer.Option(help="When in_features is not a multiple of M: error, or dense (keep the tail dense).")
]
DtypeOpt = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
OnePatternOpt = Annotated[str, typer.Option(help="N:M or unstructured:<density>.")]
OneCriterionOpt = Annotated[str, typer.Option(help="magnitude, wina, amber, clact or variance.")]
FlopShareOpt = Annotated[float, typer.Option(help="Share of linear FLOPs a policy keeps sparse.")]
AmberSkipOpt = Annotated[int, typer.Option(help="Most sensitive q/gate layers the amber policy may skip.")]
SeqlenOpt = Annotated[int, typer.Option(help="Tokens per window, BOS included.")]
CalibWindowsOpt = Annotated[
    int,
    typer.Option(
        help="Calibration windows (calibration split) for policies, smoothing, learnable corrections, Wanda, SparseGPT."
    ),
]
StepsOpt = Annotated[
    int | None,
    typer.Option(
        help="Learnable corrections: optimiser steps per block (default: one pass over the windows)."
    ),
]
LrOpt = Annotated[float, typer.Option(help="Learnable corrections: peak AdamW learning rate.")]
BackendOpt = Annotated[
    str,
    typer.Option(
        help="emulated: zero the dropped inputs, multiply densely; cpu-kernel: multiply only the kept "
        "inputs (compiled sparse GEMM, float32 N:M on the CPU)."
    ),
]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _calibration(tokenizer: PreTrainedTokenizerBase, dataset: str, seqlen: int, count: int) -> torch.Tensor:
    """Token windows from the calibration split (never the evaluation text)."""
    return token_windows(tokenizer, load_text(dataset, "calibration"), seqlen, count)


def _quality_table(rows: list[EvalRow], title: str) -> Table:
    table = Table(title=title)
    table.add_column("config", no_wrap=True)
    task_names = list(rows[0].tasks or {})
    generation = any(row.generation for row in rows)
    columns = ["ppl", "KL", "top-1", "sparse FLOPs", "density", "removed", *task_names]
    for column in columns + (["gen. ROUGE-L", "gen. identical"] if generation else []):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        flops = row.flops
        density = flops["measured_density"]
        removed = flops["measured_removed_share"]
        cells = [
            row.label,
            f"{row.perplexity:.2f}",
            f"{row.kl_to_dense:.4f}",
            f"{row.top1_agreement:.1%}",
            f"{flops['sparse_share']:.1%}",
            "—" if density is None else f"{density:.3f}",
            "—" if removed is None else f"{removed:.1%}",
        ]
        cells += [f"{row.tasks[name]['acc']:.1%}" for name in task_names]
        if generation:
            gen = row.generation
            cells += (
                ["—", "—"] if gen is None else [f"{gen['mean_rouge_l']:.3f}", f"{gen['identical_share']:.0%}"]
            )
        table.add_row(*cells)
    return table


@app.command("eval")
def eval_command(
    model: ModelOpt = "smollm2-135m",
    pattern: PatternOpt = "2:4,8:16,16:32",
    criterion: CriterionOpt = "magnitude,amber",
    policy: Annotated[str, typer.Option(help="Comma-separated layer policies: all, amber, budget.")] = "all",
    mitigation: Annotated[
        str,
        typer.Option(
            help="Comma-separated corrections: none, shift, var, smooth, learnable, or joined with + "
            "(shift+var, shift+learnable)."
        ),
    ] = "none",
    flop_share: FlopShareOpt = 0.55,
    amber_skip: AmberSkipOpt = 5,
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
    dataset: Annotated[
        str, typer.Option(help="sotu, wikitext2, or a path to a text file (evaluation split).")
    ] = "sotu",
    seqlen: SeqlenOpt = 512,
    windows: Annotated[int, typer.Option(help="Number of windows to evaluate; 0 for the whole split.")] = 32,
    calib_windows: CalibWindowsOpt = 16,
    calib_steps: StepsOpt = None,
    lr: LrOpt = CalibrationSettings.lr,
    phase: PhaseOpt = "prefill",
    include: IncludeOpt = [DEFAULT_TARGETS],
    exclude: ExcludeOpt = [],
    remainder: RemainderOpt = "error",
    backend: BackendOpt = "emulated",
    dtype: DtypeOpt = "float32",
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
    limit: Annotated[int | None, typer.Option(help="Examples per task (lm-eval --limit).")] = None,
    task_dir: Annotated[
        Path | None, typer.Option(help="Folder of lm-eval YAML task definitions, e.g. reading local files.")
    ] = None,
    generate: Annotated[
        int, typer.Option(help="Prompts (cut from the evaluation text) for generation agreement; 0 skips it.")
    ] = 0,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens per generation prompt.")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens generated per prompt.")] = 32,
) -> None:
    """Perplexity, KL to dense and top-1 agreement of the dense model and every variant; with
    --tasks, zero-shot accuracy through lm-eval; with --generate, agreement of greedy continuations.

    Without --variant/--variants/--recipe: every pattern × criterion × policy × mitigation, plus
    weight pruning per pattern.
    """
    shared = {"phase": phase, "include": tuple(include), "exclude": tuple(exclude), "remainder": remainder}
    shared |= {"flop_share": flop_share, "amber_skip": amber_skip, "backend": backend}
    settings = CalibrationSettings(steps=calib_steps, lr=lr)
    configs: list[Variant] = [parse_variant(spec, shared) for spec in variant]
    if variants is not None:
        configs += read_variants(variants, shared)
    configs += [load_recipe(folder).with_backend(backend) for folder in recipe]
    if not configs:
        configs = cross_product(
            _split(pattern), _split(criterion), _split(policy), _split(mitigation), _split(weights), shared
        )
    text = load_text(dataset, "evaluation")
    loaded, tokenizer = load_model(model, dtype)
    tokens = token_windows(tokenizer, text, seqlen, windows or None)
    calibration = None
    if any(c.needs_calibration for c in configs):
        calibration = _calibration(tokenizer, dataset, seqlen, calib_windows)
    # An interrupted run leaves its totals beside --out; the same command resumes from them.
    rows = evaluate(
        loaded,
        tokens,
        configs,
        calibration,
        checkpoint=out.with_name(out.name + ".partial"),
        calibration_settings=settings,
    )
    if tasks:
        results = evaluate_tasks(
            loaded, tokenizer, configs, _split(tasks), calibration, settings, text, limit
        )
        for row, result in zip(rows, results):
            row.tasks = result
    if generate:
        prompts = token_windows(tokenizer, text, prompt_tokens, generate)
        agreements = evaluate_generation(loaded, configs, prompts, new_tokens, calibration, settings)
        for row, agreement in zip(rows[1:], agreements):
            row.generation = agreement.to_dict()
    text_info = {
        "source": dataset,
        "split": "evaluation",
        "seqlen": seqlen,
        "windows": len(tokens),
        "tokens": tokens.numel(),
        "calibration_windows": 0 if calibration is None else len(calibration),
    }
    write_json_atomic(out, results_document(rows, model, text_info))
    title = f"{model}, {dataset} evaluation split, {len(tokens)} windows × {seqlen} tokens"
    if markdown is not None:
        write_text_atomic(markdown, results_markdown(rows, title))
    console.print(_quality_table(rows, title))
    console.print(
        "ppl: perplexity; KL: mean KL(dense ‖ sparse) per token; top-1: agreement with the dense model's "
        "next token; sparse FLOPs: share of linear FLOPs (LM head excluded) with sparse inputs (or sparse "
        "weights); density: measured share of non-zero inputs (or weights); removed: share of linear FLOPs removed."
    )
    console.print(f"Saved to {out}")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="Recipe folder to write (replaced atomically).")],
    model: ModelOpt = "smollm2-135m",
    pattern: OnePatternOpt = "8:16",
    criterion: OneCriterionOpt = "amber",
    mitigation: Annotated[
        str, typer.Option(help="learnable, shift+learnable, smooth+learnable, or a training-free one.")
    ] = "learnable",
    policy: Annotated[str, typer.Option(help="Layer policy: all, amber or budget.")] = "all",
    flop_share: FlopShareOpt = 0.55,
    amber_skip: AmberSkipOpt = 5,
    dataset: Annotated[
        str, typer.Option(help="sotu, wikitext2, or a text file (calibration split).")
    ] = "sotu",
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 32,
    steps: StepsOpt = None,
    lr: LrOpt = CalibrationSettings.lr,
    phase: PhaseOpt = "prefill",
    include: IncludeOpt = [DEFAULT_TARGETS],
    exclude: ExcludeOpt = [],
    remainder: RemainderOpt = "error",
) -> None:
    """Calibrate one configuration on the calibration split and save it as a recipe folder.

    Learnable corrections are fitted block by block; policies and smoothing are measured. Evaluate
    the result with `actsparse eval --recipe DIR`; in Python, `sparsify(model, recipe=load_recipe(DIR))`.
    """
    config = SparsityConfig(
        pattern,
        criterion,
        phase,
        tuple(include),
        tuple(exclude),
        remainder,
        policy,
        flop_share,
        amber_skip,
        **mitigation_settings(mitigation),
    )
    settings = CalibrationSettings(steps=steps, lr=lr)
    loaded, tokenizer = load_model(model)
    calibration = _calibration(tokenizer, dataset, seqlen, calib_windows)
    handle = sparsify(loaded, config, calibration, calibration_settings=settings)
    recipe = handle.recipe()
    text = {"source": dataset, "split": "calibration", "seqlen": seqlen, "windows": len(calibration)}
    recipe.calibration = (recipe.calibration or {}) | {"text": text}
    recipe.save(out)
    blocks = (handle.calibration or {}).get("blocks", [])
    if blocks:
        table = Table(title=f"{model}: {config.label}, MSE of each block's output to the dense model")
        for column in ("block", "before", "after", "change"):
            table.add_column(column, justify="left" if column == "block" else "right", no_wrap=True)
        for block in blocks:
            before, after = block["loss_before"], block["loss_after"]
            table.add_row(block["block"], f"{before:.4g}", f"{after:.4g}", f"{after / before - 1:+.1%}")
        console.print(table)
    console.print(
        f"Recipe for {config.label} saved to {out}; evaluate it with `actsparse eval --recipe {out}`."
    )


@app.command()
def sweep(
    model: ModelOpt = "smollm2-135m",
    patterns: Annotated[
        str, typer.Option(help="Comma-separated patterns.")
    ] = "2:4,4:8,8:16,16:32,unstructured:0.5",
    criteria: Annotated[str, typer.Option(help="Comma-separated criteria.")] = "magnitude,amber",
    mitigations: Annotated[str, typer.Option(help="Comma-separated mitigations (as in eval).")] = "none",
    policies: Annotated[str, typer.Option(help="Comma-separated layer policies.")] = "all",
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with patterns, criteria, mitigations, policies lists and shared settings."
        ),
    ] = None,
    dataset: Annotated[str, typer.Option(help="sotu, wikitext2, or a text file.")] = "sotu",
    seqlen: SeqlenOpt = 512,
    windows: Annotated[
        int, typer.Option(help="Evaluation windows per configuration; 0 for the whole split.")
    ] = 16,
    calib_windows: CalibWindowsOpt = 16,
    phase: PhaseOpt = "prefill",
    backend: BackendOpt = "emulated",
    out: Annotated[Path, typer.Option(help="Results directory (resumes a sweep left there).")] = Path(
        "results/sweep"
    ),
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run configurations as Ray tasks on this cluster address ('auto', 'ray://...', or 'local')."
        ),
    ] = None,
) -> None:
    """Evaluate the cross product of patterns × criteria × mitigations × policies, one configuration
    at a time; an interrupted sweep resumes. Writes JSON per configuration, CSV, Markdown and plots.

    Values in --config replace the corresponding options.
    """
    axes = {"patterns": patterns, "criteria": criteria, "mitigations": mitigations, "policies": policies}
    shared: dict = {"phase": phase, "include": (DEFAULT_TARGETS,), "exclude": (), "backend": backend}
    if config is not None:
        for key, value in read_sweep_file(config).items():
            if key in axes:
                axes[key] = ",".join(value) if isinstance(value, list) else str(value)
            else:
                shared[key] = tuple(value) if isinstance(value, list) else value
    configs = cross_product(
        _split(axes["patterns"]),
        _split(axes["criteria"]),
        _split(axes["policies"]),
        _split(axes["mitigations"]),
        [],
        shared,
    )
    data = SweepData(model, dataset, seqlen, windows, calib_windows)
    evaluations = ray_evaluations(ray, data) if ray else local_evaluations(data)
    description = {"model": model, "text": data.text}
    records = run_sweep(configs, out, description, evaluations)
    titles, cells = sweep_cells(records)
    table = Table(title=sweep_title(records, description))
    for index, title in enumerate(titles):
        table.add_column(title, justify="left" if index == 0 else "right", no_wrap=index == 0)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    console.print(
        "I/O: bytes of a compressed 512 × 4096 activation tile (values and index) over dense bytes."
    )
    console.print(
        f"Saved to {out}: configs/*.json, sweep.csv, sweep.md, quality_vs_pattern.png, quality_vs_flops.png"
    )


@app.command()
def sensitivity(
    model: ModelOpt = "smollm2-135m",
    pattern: OnePatternOpt = "8:16",
    criterion: OneCriterionOpt = "amber",
    dataset: Annotated[
        str, typer.Option(help="sotu, wikitext2, or a text file (calibration split).")
    ] = "sotu",
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 16,
    include: IncludeOpt = [DEFAULT_TARGETS],
    exclude: ExcludeOpt = [],
    remainder: RemainderOpt = "error",
    out: Annotated[Path, typer.Option(help="JSON file of the sensitivities.")] = Path(
        "results/sensitivity.json"
    ),
) -> None:
    """Relative output error ‖Y − Y'‖/‖Y‖ of every target layer sparsified alone, most sensitive first."""
    config = SparsityConfig(
        pattern, criterion, include=tuple(include), exclude=tuple(exclude), remainder=remainder
    )
    loaded, tokenizer = load_model(model)
    calibration = _calibration(tokenizer, dataset, seqlen, calib_windows)
    candidates = target_layers(loaded, config)
    ranked = sorted(layer_sensitivity(loaded, calibration, candidates, config).items(), key=lambda kv: -kv[1])
    write_json_atomic(
        out,
        {
            "model": model,
            "config": config.to_dict(),
            "calibration_windows": len(calibration),
            "sensitivity": dict(ranked),
        },
    )
    table = Table(title=f"{model}: sensitivity to {config.label} ({len(calibration)} calibration windows)")
    for column, justify in (("rank", "right"), ("layer", "left"), ("‖Y − Y'‖ / ‖Y‖", "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for rank, (name, value) in enumerate(ranked, 1):
        table.add_row(str(rank), name, f"{value:.4f}")
    console.print(table)
    console.print(f"Saved to {out}")


@app.command()
def info(
    model: ModelOpt = "smollm2-135m",
    pattern: OnePatternOpt = "8:16",
    criterion: OneCriterionOpt = "amber",
    policy: Annotated[
        str, typer.Option(help="all, amber or budget (these two measure on calibration text).")
    ] = "all",
    flop_share: FlopShareOpt = 0.55,
    amber_skip: AmberSkipOpt = 5,
    dataset: Annotated[
        str, typer.Option(help="Calibration text for policies: sotu, wikitext2 or a file.")
    ] = "sotu",
    seqlen: SeqlenOpt = 512,
    calib_windows: CalibWindowsOpt = 16,
    phase: PhaseOpt = "prefill",
    include: IncludeOpt = [DEFAULT_TARGETS],
    exclude: ExcludeOpt = [],
    remainder: RemainderOpt = "error",
    backend: BackendOpt = "emulated",
) -> None:
    """The layers a configuration would sparsify, the share of linear FLOPs it makes sparse, and how
    the sparse calls are computed."""
    if len(_split(pattern)) != 1 or len(_split(criterion)) != 1:
        raise ActsparseError(
            "`actsparse info` describes one configuration; give one --pattern and one --criterion."
        )
    config = SparsityConfig(
        pattern,
        criterion,
        phase,
        tuple(include),
        tuple(exclude),
        remainder,
        policy,
        flop_share,
        amber_skip,
        backend=backend,
    )
    loaded, tokenizer = load_model(model)
    calibration = None
    if config.needs_calibration:
        calibration = _calibration(tokenizer, dataset, seqlen, calib_windows)
    handle = sparsify(loaded, config, calibration)
    report = flop_report(loaded, handle)
    table = Table(title=f"{model}: {config.label}, phase {config.phase}")
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
    console.print(f"Execution: {_execution(config, handle)}")


def _execution(config: SparsityConfig, handle: SparsityHandle) -> str:
    """How the sparse calls of ``handle`` are computed, in one sentence."""
    selection = (
        f"selection compiled for float32 N:M on the CPU, {kernels.select_isa()}"
        if kernels.AVAILABLE
        else "selection in PyTorch: the compiled extension was not built"
    )
    kernel_layers = sum(layer.packed is not None for layer in handle.layers.values())
    if config.backend == "cpu-kernel" and kernel_layers:
        return (
            f"cpu-kernel: {kernel_layers} layers multiply only the kept inputs (sparse GEMM "
            f"{kernels.gemm_isa()}, selection {kernels.select_isa()}) in float32 calls on the CPU; "
            "other calls are emulated."
        )
    if config.backend == "cpu-kernel":
        return (
            "emulated, although cpu-kernel was asked for: the compiled extension was not built "
            "(reinstall actsparse where a C compiler is present)."
        )
    return f"emulated: dropped inputs are zeroed and multiplied densely ({selection})."


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
    for name in dataset:
        load_text(name, "evaluation")
        console.print(f"text {name}: ready")
    for name in model:
        console.print(f"model {name}: ready in {resolve_model(name)}")


def main() -> None:
    """Entry point of the console script."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app()
    except ActsparseError as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        errors.print(
            "interrupted; `actsparse eval` resumes from where it stopped when run again with the same options"
        )
        sys.exit(130)
