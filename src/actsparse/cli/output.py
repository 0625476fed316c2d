"""What the commands print: the tables and sentences on the console, and errors on stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from actsparse.config import SparsityConfig
from actsparse.core.cpu import measure_verdict
from actsparse.eval.evaluate import EvalRow, provenance_line
from actsparse.eval.flops import flop_report
from actsparse.eval.report import ResultTable
from actsparse.eval.sweep import SweepData, sweep_table
from actsparse.io.models import EMBEDDED_MODELS, converted_dir
from actsparse.pieces.base import BACKENDS
from actsparse.sparse.handle import SparsityHandle

# Tables are wider than the 80 columns rich assumes when the output is a file or a pipe.
console = Console() if sys.stdout.isatty() else Console(width=120)
errors = Console(stderr=True)

QUALITY_LEGEND = (
    "ppl: perplexity; KL: mean KL(dense ‖ sparse) per token; top-1: agreement with the dense model's "
    "next token; sparse FLOPs: share of linear FLOPs (LM head excluded) with sparse inputs (or sparse "
    "weights); density: measured share of non-zero inputs (or weights); removed: share of linear FLOPs removed; "
    "prepared in: time to measure and calibrate the variant (shown when one took a second or more)."
)


def error(message: str) -> None:
    """A user mistake, as one line on stderr."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def recipe_origins(rows: list[EvalRow]) -> list[str]:
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


def quality(table: ResultTable, rows: list[EvalRow], out: Path) -> None:
    """`eval`: the quality table, its legend, where each recipe came from, and where it was saved."""
    console.print(table.rich())
    console.print(QUALITY_LEGEND)
    for line in recipe_origins(rows):
        console.print(line)
    console.print(f"Saved to {out}")


def calibration(handle: SparsityHandle, model: str, searched: bool, out: Path) -> None:
    """`calibrate`: the held-out objective of every fitted block (and, when rates were searched, the
    least at each rate), then where the recipe was saved."""
    blocks = (handle.calibration or {}).get("blocks", [])
    if blocks:
        table = Table(
            title=f"{model}: {handle.label}, calibration objective on the held-out calibration windows"
        )
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


def sweep(records: list[dict[str, Any]], data: SweepData, out: Path) -> None:
    """`sweep`: the table of every configuration and the files written."""
    console.print(sweep_table(records, data.describe()).rich())
    console.print(
        "I/O: bytes of a compressed 512 × 4096 activation tile (values and index) over dense bytes."
    )
    console.print(
        f"Saved to {out}: configs/*.json, sweep.csv, sweep.md, quality_vs_pattern.png, quality_vs_flops.png"
    )


def sensitivity(
    model: str,
    sparsity: SparsityConfig,
    windows: int,
    ranked: dict[str, float],
    by_share: list[dict[str, Any]],
    out: Path,
) -> None:
    """`sensitivity`: every layer's cost alone, most costly first, and the least summed cost at
    each FLOP share."""
    cost = sparsity.policy.cost_name
    table = Table(title=f"{model}: sensitivity to {sparsity.label} ({windows} calibration windows)")
    for column, justify in (("rank", "right"), ("layer", "left"), (cost, "right")):
        table.add_column(column, justify=justify, no_wrap=True)
    for rank, (name, value) in enumerate(ranked.items(), 1):
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


def layers(loaded: nn.Module, handle: SparsityHandle, model: str) -> None:
    """`info`: each target layer and whether it is sparse, the FLOP shares, how the sparse calls are
    computed, and, for the cpu-kernel backend, whether it beats the dense product on this CPU."""
    sparsity, report = handle.config, flop_report(loaded, handle)
    table = Table(title=f"{model}: {sparsity.label}, phase {sparsity.phase}")
    table.add_column("layer", no_wrap=True)
    for column in ("in", "out", "MFLOPs/token", "sparse", "density"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in report.layers:
        table.add_row(
            layer.name, str(layer.in_features), str(layer.out_features), f"{layer.flops_per_token / 1e6:.2f}",
            "yes" if layer.sparse else "no", f"{layer.nominal_density:.3f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"Sparse share of linear FLOPs: {report.sparse_share:.1%} (LM head excluded; "
        f"{report.sparse_share_with_lm_head:.1%} with the LM head of {report.lm_head_flops_per_token / 1e6:.1f} MFLOPs/token). "
        f"FLOPs removed at this density: {report.removed_share:.1%}."
    )
    sparse_layers, backend = list(handle.layers.values()), BACKENDS.get(sparsity.backend)
    console.print(f"Execution: {backend.execution(sparse_layers)}")
    packed = [layer for layer in sparse_layers if layer.state(backend) is not None]
    if sparsity.backend == "cpu-kernel" and packed:
        # The verdict is timed on the largest sparse layer's shape, in the model's dtype.
        largest = max(packed, key=lambda layer: layer.in_features * layer.out_features)
        n, m = largest.pattern.keep_count(largest.in_features)
        with console.status("Timing the cpu-kernel layer against the dense products on this CPU"):
            verdict = measure_verdict(largest.in_features, largest.out_features, n, m, largest.weight.dtype)
        console.print(f"Speed: {verdict.sentence()}")


def embedded_models() -> None:
    """`models`: the embedded models and whether each is converted into the cache yet."""
    table = Table(title="Embedded models")
    for column in ("name", "model", "package", "converted"):
        table.add_column(column)
    for m in EMBEDDED_MODELS.values():
        converted = (converted_dir(m.name) / "config.json").exists()
        table.add_row(m.name, m.description, m.package, "yes" if converted else "on first use")
    console.print(table)
