"""Sweeps: patterns × criteria × mitigations × policies, one configuration at a time, resumable.

Every finished configuration is written at once, atomically, to ``<out>/configs/<key>.json``; a
restarted sweep skips the configurations whose file exists, so none is lost or run twice. When all
are done the directory gets ``sweep.csv``, ``sweep.md`` and two plots (``quality_vs_pattern.png``,
``quality_vs_flops.png``), with the hardware cost of each pattern beside its quality.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibrate import CalibrationSettings
from actsparse.config import SparsityConfig
from actsparse.errors import ActsparseError
from actsparse.evaluate import evaluate
from actsparse.hwcost import hardware_cost
from actsparse.paths import write_json_atomic, write_text_atomic

MANIFEST = "sweep.json"
AXES = ("patterns", "criteria", "mitigations", "policies")


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep file: YAML mapping with ``patterns``, ``criteria``, ``mitigations``, ``policies``
    (lists or comma-separated strings) and any shared ``SparsityConfig`` setting."""
    import yaml

    if not path.is_file():
        raise ActsparseError(f"Sweep file '{path}' does not exist; pass a YAML file (see README).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ActsparseError(f"Sweep file '{path}' is not valid YAML ({error}); fix it.") from None
    if not isinstance(data, dict):
        raise ActsparseError(f"Sweep file '{path}' must be a mapping such as patterns: \"2:4,8:16\".")
    known = set(AXES) | {f.name for f in fields(SparsityConfig) if f.init} - {"pattern", "criterion", "policy", "mitigation"}
    if unknown := set(data) - known:
        raise ActsparseError(
            f"Unknown key(s) {', '.join(sorted(unknown))} in sweep file '{path}'; known: {', '.join(sorted(known))}."
        )
    patterns = data.get("patterns", [])
    if not isinstance(patterns, str) and any(not isinstance(p, str) for p in patterns):
        raise ActsparseError(
            f"Patterns in '{path}' must be quoted (\"2:4\"): unquoted, YAML reads 2:4 as the number 124."
        )
    return data


def config_key(config: SparsityConfig) -> str:
    """File name of a configuration's result: its label made file-safe, and a hash of all settings."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9+.=-]+', '_', config.label)}-{digest}"


def _record(config: SparsityConfig, rows: list) -> dict[str, Any]:
    dense, row = rows
    pattern = config.parsed_pattern
    # The I/O figures are for a 512 × 4096 activation tile (trimmed to whole groups of M).
    channels = 4096 if pattern.unstructured else 4096 - 4096 % pattern.m or pattern.m
    return {
        "key": config_key(config),
        "label": row.label,
        "config": row.config,
        "perplexity": row.perplexity,
        "kl_to_dense": row.kl_to_dense,
        "top1_agreement": row.top1_agreement,
        "dense_perplexity": dense.perplexity,
        "flops": row.flops,
        "hwcost": hardware_cost(pattern, tokens=512, channels=channels).to_dict(),
    }


def run_sweep(
    model: nn.Module,
    windows: torch.Tensor,
    configs: list[SparsityConfig],
    out: Path,
    description: dict[str, Any],
    calibration: torch.Tensor | None = None,
    calibration_settings: CalibrationSettings | None = None,
    progress: bool = True,
    evaluate_one: Callable[[SparsityConfig], list] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every configuration not yet in ``out`` and write the tables and plots.

    ``description`` (model, text, windows) is saved as ``out/sweep.json``; a directory holding a
    sweep with another description is refused rather than mixed. Returns every record, in the
    order of ``configs``.
    """
    manifest = out / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()) != description:
        raise ActsparseError(
            f"{out} holds a sweep of another model or text ({manifest}); choose another --out or remove it."
        )
    write_json_atomic(manifest, description)
    evaluate_one = evaluate_one or (
        lambda config: evaluate(
            model, windows, [config], calibration, progress=False, calibration_settings=calibration_settings
        )
    )
    pending = [c for c in configs if not (out / "configs" / f"{config_key(c)}.json").exists()]
    for config in tqdm(pending, desc="sweep", unit="config", disable=not progress):
        record = _record(config, evaluate_one(config))
        write_json_atomic(out / "configs" / f"{record['key']}.json", record)
    records = [json.loads((out / "configs" / f"{config_key(c)}.json").read_text()) for c in configs]
    write_text_atomic(out / "sweep.csv", sweep_csv(records))
    write_text_atomic(out / "sweep.md", sweep_markdown(records, description))
    plot_sweep(records, out)
    return records


COLUMNS = (
    ("label", "configuration", "{}"),
    ("pattern", "pattern", "{}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("kl_to_dense", "KL to dense", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.1%}"),
    ("sparse_share", "sparse FLOPs", "{:.1%}"),
    ("removed_share", "FLOPs removed", "{:.1%}"),
    ("index_bits", "index bits / group", "{}"),
    ("io_ratio_fp16", "I/O fp16", "{:.3f}"),
    ("io_ratio_int8", "I/O int8", "{:.3f}"),
)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    flops, cost = record["flops"], record["hwcost"]
    removed = flops["measured_removed_share"]
    bits = cost["index_bits_per_group"]
    return {
        "label": record["label"],
        "pattern": record["config"]["pattern"],
        "perplexity": record["perplexity"],
        "kl_to_dense": record["kl_to_dense"],
        "top1_agreement": record["top1_agreement"],
        "sparse_share": flops["sparse_share"],
        "removed_share": flops["removed_share"] if removed is None else removed,
        "index_bits": "bitmap" if bits is None else bits,
        "io_ratio_fp16": cost["io_ratio_fp16"],
        "io_ratio_int8": cost["io_ratio_int8"],
    }


def sweep_csv(records: list[dict[str, Any]]) -> str:
    """One row per configuration, raw numbers."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[key for key, _, _ in COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(_flat(record) for record in records)
    return buffer.getvalue()


def sweep_title(records: list[dict[str, Any]], description: dict[str, Any]) -> str:
    dense = records[0]["dense_perplexity"] if records else float("nan")
    return f"{description.get('model')}, {description.get('text')} (dense perplexity {dense:.2f})"


def sweep_cells(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Column titles and formatted cells of the sweep table."""
    titles = [title for _, title, _ in COLUMNS]
    return titles, [[fmt.format(_flat(r)[key]) for key, _, fmt in COLUMNS] for r in records]


def sweep_markdown(records: list[dict[str, Any]], description: dict[str, Any]) -> str:
    """The sweep as a Markdown table (I/O: compressed over dense bytes of an activation tile)."""
    titles, cells = sweep_cells(records)
    lines = [
        f"**{sweep_title(records, description)}**",
        "",
        "| " + " | ".join(titles) + " |",
        "|---|---|" + "---:|" * (len(titles) - 2),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def plot_sweep(records: list[dict[str, Any]], out: Path) -> None:
    """``quality_vs_pattern.png`` (perplexity and KL against pattern, a line per criterion,
    mitigation and policy) and ``quality_vs_flops.png`` (KL against the share of FLOPs removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(record["config"]["pattern"] for record in records))
    lines: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        config = record["config"]
        name = " ".join(
            part
            for part in (
                config["criterion"],
                "" if config["mitigation"] == "none" else config["mitigation"],
                "" if config.get("smooth", "none") == "none" else config["smooth"],
                "" if config["policy"] == "all" else f"policy={config['policy']}",
            )
            if part
        )
        lines.setdefault(name, []).append(record)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, group in lines.items():
        xs = [patterns.index(r["config"]["pattern"]) for r in group]
        axes[0].plot(xs, [r["perplexity"] for r in group], marker="o", label=name)
        axes[1].plot(xs, [r["kl_to_dense"] for r in group], marker="o", label=name)
    dense = records[0]["dense_perplexity"]
    axes[0].axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    for axis, title in zip(axes, ("perplexity (lower is better)", "KL to dense (lower is better)")):
        axis.set_xticks(range(len(patterns)), patterns)
        axis.set_xlabel("pattern")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    _save(figure, out / "quality_vs_pattern.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4.2))
    for name, group in lines.items():
        flat = [_flat(r) for r in group]
        axis.scatter([f["removed_share"] for f in flat], [f["kl_to_dense"] for f in flat], label=name)
        for f in flat:
            axis.annotate(f["pattern"], (f["removed_share"], f["kl_to_dense"]), fontsize=7, alpha=0.8)
    axis.set_xlabel("share of linear FLOPs removed")
    axis.set_ylabel("KL to dense")
    axis.set_title("quality against compute saved")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, out / "quality_vs_flops.png")
    plt.close(figure)


def _save(figure: Any, path: Path) -> None:
    """Save a figure through a temporary file and an atomic rename."""
    scratch = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(scratch, dpi=130)
    scratch.replace(path)
