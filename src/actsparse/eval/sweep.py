"""Sweeps: the cross product of any settings (patterns × criteria × corrections × policies × ...),
evaluated together against one dense pass per window, resumable.

Every finished configuration is written at once, atomically, to ``<out>/configs/<key>.json``; a
restarted sweep skips the configurations whose file exists, so none is lost or run twice. When all
are done the directory gets ``sweep.csv``, ``sweep.md`` and two plots (``quality_vs_pattern.png``,
``quality_vs_flops.png``), with the hardware cost of each pattern beside its quality.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from actsparse.config import CalibrationSettings, SparsityConfig, config_settings, current_names
from actsparse.core.devices import resolve_device
from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.paths import write_json_atomic, write_text_atomic
from actsparse.eval.evaluate import evaluate, provenance, provenance_line
from actsparse.eval.hwcost import hardware_cost
from actsparse.eval.report import ResultTable
from actsparse.io.models import load_model
from actsparse.io.text import (
    WindowSample,
    calibration_text,
    calibration_windows,
    evaluation_text,
    token_windows,
)

MANIFEST = "sweep.json"


def read_sweep_file(path: Path) -> dict[str, Any]:
    """A sweep file: a YAML mapping from setting names (those of the command-line options, e.g.
    ``pattern``, ``criterion``, ``corrections``, ``policy``, ``flop_share``) to a value, a list of
    values or comma-separated values; read by ``configs_from_settings``."""
    if not path.is_file():
        raise ActsparseError(f"Sweep file '{path}' does not exist; pass a YAML file (see README).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ActsparseError(f"Sweep file '{path}' is not valid YAML ({error}); fix it.") from None
    if not isinstance(data, dict):
        raise ActsparseError(f"Sweep file '{path}' must be a mapping such as pattern: \"2:4,8:16\".")
    data = current_names({str(key): value for key, value in data.items()})
    known = [setting.name for setting in config_settings()]
    if unknown := set(data) - set(known):
        raise ActsparseError(
            f"Unknown key(s) {shorten(', '.join(sorted(unknown)))} in sweep file '{path}'; "
            f"known: {', '.join(known)}."
        )
    for key, value in data.items():
        # Only flat values: a nested list or mapping (YAML aliases nest lists cheaply, and expanded
        # they can fill the memory) is refused before anything is expanded.
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(item, (str, int, float, bool)) for item in values):
            raise ActsparseError(
                f"'{key}' in sweep file '{path}' must be a value or a list of values (pattern: [\"2:4\", "
                "\"8:16\"]), not a nested list or mapping; write the values out in one list."
            )
    patterns = data.get("pattern", [])
    if not isinstance(patterns, (str, list)) or any(not isinstance(p, str) for p in patterns):
        raise ActsparseError(
            f"Patterns in '{path}' must be quoted (\"2:4\"): unquoted, YAML reads 2:4 as the number 124."
        )
    return data


def config_key(config: SparsityConfig) -> str:
    """File name of a configuration's result: its label made file-safe, and a hash of all settings."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9+.=-]+', '_', config.label)}-{digest}"


def _record(config: SparsityConfig, rows: list, data: SweepData) -> dict[str, Any]:
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
        "calibration_text": data.calibration_description(config),
        "flops": row.flop_totals(),
        "hwcost": hardware_cost(pattern, tokens=512, channels=channels).to_dict(),
    }


@dataclass(frozen=True)
class SweepData:
    """The model, texts and calibration settings of a sweep, by name: enough for any worker to
    rebuild them."""

    model: str
    dataset: str
    seqlen: int
    windows: int
    calib_windows: int
    dtype: str = "float32"
    calib_dataset: str | None = None
    calibration_settings: CalibrationSettings = field(default_factory=CalibrationSettings)
    device: str = "auto"
    device_map: str | None = None
    batch_size: int = 1
    calib_sample: WindowSample = "spread"

    @property
    def text(self) -> str:
        count = f"{self.windows} windows" if self.windows else "all windows"
        return f"{self.dataset} evaluation split, {count} × {self.seqlen} tokens"

    def calibration_description(self, config: SparsityConfig) -> dict[str, Any] | None:
        """Which text calibrated ``config`` (None when it needs none)."""
        if not config.needs_calibration:
            return None
        part = calibration_text(self.dataset, self.calib_dataset).describe()
        return part | {"windows": self.calib_windows, "seqlen": self.seqlen, "sample": self.calib_sample}

    def describe(self) -> dict[str, Any]:
        """What every configuration of the sweep shares (its manifest)."""
        return {
            "model": self.model,
            "text": self.text,
            "dtype": self.dtype,
            "device": resolve_device(self.device).type if self.device_map is None else "device map",
            "calibration": {
                "text": calibration_text(self.dataset, self.calib_dataset).describe(),
                "windows": self.calib_windows,
                "sample": self.calib_sample,
                "settings": self.calibration_settings.to_dict(),
            },
        }


Evaluations = Callable[[list[SparsityConfig]], Iterator[tuple[SparsityConfig, list]]]
"""Runs configurations and yields each with its evaluation rows (dense, sparse) as it finishes."""


@functools.cache
def load_sweep_inputs(
    data: SweepData, calibration_needed: bool
) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The model, evaluation windows and (if needed) calibration windows of ``data``, once per process."""
    model, tokenizer = load_model(data.model, data.dtype, device=data.device, device_map=data.device_map)
    windows = token_windows(
        tokenizer, evaluation_text(data.dataset).text(), data.seqlen, data.windows or None
    )
    calibration = None
    if calibration_needed:
        part = calibration_text(data.dataset, data.calib_dataset)
        calibration, _ = calibration_windows(
            tokenizer, part, data.seqlen, data.calib_windows, data.calib_sample
        )
    return model, windows, calibration


def evaluate_configs(
    data: SweepData, configs: list[SparsityConfig], checkpoint: Path | None = None, progress: bool = False
) -> list:
    """Dense and every configuration's rows over the sweep's windows, with one dense pass per
    window for all of them (loads the inputs on first use); ``checkpoint`` as in ``evaluate``."""
    model, windows, calibration = load_sweep_inputs(data, any(c.needs_calibration for c in configs))
    return evaluate(
        model,
        windows,
        list(configs),
        calibration,
        progress=progress,
        checkpoint=checkpoint,
        calibration_settings=data.calibration_settings,
        batch_size=data.batch_size,
    )


def evaluate_config(data: SweepData, config: SparsityConfig) -> list:
    """Dense and ``config`` rows over the sweep's windows (a Ray task: one configuration)."""
    return evaluate_configs(data, [config])


def local_evaluations(data: SweepData, checkpoint: Path | None = None, group: int = 0) -> Evaluations:
    """Run the configurations in this process, ``group`` at a time (0: all at once) against one
    dense pass per window, so a configuration costs ``1 + 1/group`` forward passes instead of 2.
    The prepared configurations of a group are held together (their transformed weights with
    them, under smoothing, W8A8 or learned corrections); ``checkpoint`` keeps a group's running
    totals until its records are written, so an interrupted group resumes where it stopped."""

    def run(pending: list[SparsityConfig]) -> Iterator[tuple[SparsityConfig, list]]:
        size = group or max(len(pending), 1)
        for start in range(0, len(pending), size):
            configs = pending[start : start + size]
            dense, *rows = evaluate_configs(data, configs, checkpoint, progress=True)
            yield from ((config, [dense, row]) for config, row in zip(configs, rows))
            if checkpoint is not None:  # the group's records are written: its totals may go
                checkpoint.unlink(missing_ok=True)

    return run


def ray_evaluations(address: str, data: SweepData) -> Evaluations:
    """Run the configurations as Ray tasks on the cluster at ``address`` ("local" starts one here);
    every worker needs actsparse installed and rebuilds the model and text from ``data``."""
    try:
        import ray
    except ImportError:
        raise ActsparseError("--ray needs Ray; install it with `pip install 'actsparse[ray]'`.") from None
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, log_to_driver=False)
    remote = ray.remote(evaluate_config)

    def run(pending: list[SparsityConfig]) -> Iterator[tuple[SparsityConfig, list]]:
        running = {remote.remote(data, config): config for config in pending}
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            yield running.pop(done), ray.get(done)

    return run


def _read_record(out: Path, config: SparsityConfig) -> dict[str, Any] | None:
    """The finished record of ``config`` in ``out``, or None (missing or damaged: run it again)."""
    try:
        record = json.loads((out / "configs" / f"{config_key(config)}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == config_key(config) else None


def _read_manifest(manifest: Path) -> Any:
    try:
        return json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ActsparseError(
            f"{manifest} is damaged, so this sweep's settings are unknown; delete it to resume the finished "
            "configurations in its folder under the settings given now, or choose another --out."
        ) from None


def run_sweep(
    configs: list[SparsityConfig],
    out: Path,
    data: SweepData,
    evaluations: Evaluations,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every configuration not yet in ``out`` and write the tables and plots.

    ``data.describe()`` (model, texts, calibration settings) is saved as ``out/sweep.json``; a
    directory holding a sweep with another description is refused rather than mixed. Each
    configuration's record is written as soon as it finishes. Returns every record, in the order
    of ``configs``.
    """
    description = data.describe()
    manifest = out / MANIFEST
    if manifest.exists() and _read_manifest(manifest) != description:
        raise ActsparseError(
            f"{out} holds a sweep of another model, text, dtype, device or calibration ({manifest}); "
            "choose another --out or remove it."
        )
    write_json_atomic(manifest, description)
    pending = [c for c in configs if _read_record(out, c) is None]
    bar = tqdm(
        total=len(configs),
        initial=len(configs) - len(pending),
        desc="sweep",
        unit="config",
        disable=not progress,
    )
    for config, rows in evaluations(pending):
        record = _record(config, rows, data)
        write_json_atomic(out / "configs" / f"{record['key']}.json", record)
        bar.update()
    bar.close()
    records = [_read_record(out, c) for c in configs]
    write_text_atomic(out / "sweep.csv", sweep_csv(records))
    table = sweep_table(records, description, provenance_line(provenance()))
    write_text_atomic(out / "sweep.md", table.markdown())
    plot_sweep(records, out, sweep_title(records, description))
    return records


COLUMNS = (
    ("label", "configuration", "{}"),
    ("perplexity", "ppl", "{:.2f}"),
    ("kl_to_dense", "KL", "{:.4f}"),
    ("top1_agreement", "top-1", "{:.1%}"),
    ("sparse_share", "sparse FLOPs", "{:.1%}"),
    ("removed_share", "removed", "{:.1%}"),
    ("index_bits", "index bits", "{}"),
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
    fieldnames = ["label", "pattern", *(key for key, _, _ in COLUMNS[1:])]
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_flat(record) for record in records)
    return buffer.getvalue()


def sweep_title(records: list[dict[str, Any]], description: dict[str, Any]) -> str:
    dense = records[0]["dense_perplexity"] if records else float("nan")
    return f"{description.get('model')}, {description.get('text')} (dense perplexity {dense:.2f})"


def sweep_table(records: list[dict[str, Any]], description: dict[str, Any], source: str = "") -> ResultTable:
    """The sweep as a table (I/O: compressed over dense bytes of an activation tile), with where its
    figures come from (``source``) under the Markdown."""
    columns = [title for _, title, _ in COLUMNS]
    cells = [[fmt.format(_flat(r)[key]) for key, _, fmt in COLUMNS] for r in records]
    return ResultTable(sweep_title(records, description), columns, cells, source)


def plot_sweep(records: list[dict[str, Any]], out: Path, subtitle: str = "") -> None:
    """``quality_vs_pattern.png`` (perplexity and KL against pattern, a line per criterion,
    corrections and policy) and ``quality_vs_flops.png`` (KL against the share of FLOPs removed)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(record["config"]["pattern"] for record in records))
    lines: dict[str, list[dict[str, Any]]] = {}
    for record in records:  # one line per configuration but its pattern: the label after it
        name = record["label"].split(" ", 1)[1] if " " in record["label"] else record["label"]
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
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    _save(figure, out / "quality_vs_pattern.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    labelled = set()
    for name, group in lines.items():
        flat = [_flat(r) for r in group]
        axis.scatter([f["removed_share"] for f in flat], [f["kl_to_dense"] for f in flat], label=name)
        for f in flat:
            spot = (f["pattern"], round(f["removed_share"], 2), round(f["kl_to_dense"], 1))
            if spot not in labelled:  # one label per pattern and place, not one per criterion
                labelled.add(spot)
                axis.annotate(
                    f["pattern"],
                    (f["removed_share"], f["kl_to_dense"]),
                    (6, 0),
                    textcoords="offset points",
                    fontsize=8,
                )
    axis.set_xlim(0, 1)
    axis.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axis.set_xlabel("share of linear FLOPs removed (measured density)")
    axis.set_ylabel("KL to dense (lower is better)")
    axis.set_title("quality against compute saved")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    _save(figure, out / "quality_vs_flops.png")
    plt.close(figure)


def _save(figure: Any, path: Path) -> None:
    """Save a figure through a temporary file and an atomic rename."""
    scratch = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(scratch, dpi=130)
    scratch.replace(path)
