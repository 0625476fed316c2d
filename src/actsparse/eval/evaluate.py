"""Quality of sparse configurations against the dense model, over the same token windows.

For every configuration: perplexity, mean KL divergence ``KL(p_dense ‖ p_sparse)`` of the
next-token distribution, and top-1 agreement with the dense model's next-token choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from actsparse.calibration.measure import weights_digest
from actsparse.config import CalibrationSettings
from actsparse.core.cpu import this_cpu
from actsparse.core.distribution import Totals, dense_reference, next_token_logits
from actsparse.core.paths import write_json_atomic
from actsparse.eval.flops import flop_report
from actsparse.eval.report import ResultTable
from actsparse.eval.variants import Prepared, Variant, prepare_variants
from actsparse.sparse.density import DensityCounter
from actsparse.sparse.handle import SparsityHandle
from actsparse.version import __version__


@dataclass
class EvalRow:
    """Figures of one variant; ``config`` is its description (None for the dense model)."""

    label: str
    config: dict[str, Any] | None
    perplexity: float
    kl_to_dense: float
    top1_agreement: float
    flops: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] | None = None
    generation: dict[str, Any] | None = None
    prepare_seconds: float | None = None

    def flop_totals(self) -> dict[str, Any]:
        """The FLOP accounting without its per-layer part."""
        return {key: value for key, value in self.flops.items() if key != "layers"}

    def to_dict(self, layer_details: bool = False) -> dict[str, Any]:
        """JSON-ready figures. Each layer's FLOP accounting and the policy's measured sensitivity
        of each layer only with ``layer_details``: they repeat in every row that shares a pattern
        or a measurement and outweigh the rest of the row a hundredfold (the layers a policy
        chose are always there)."""
        document = asdict(self)
        if not layer_details:
            document["flops"] = self.flop_totals()
            if isinstance((document["config"] or {}).get("sensitivity"), dict):
                del document["config"]["sensitivity"]
        return document


def _run_key(
    model: nn.Module,
    windows: torch.Tensor,
    handles: list[Prepared],
    calibration: torch.Tensor | None,
    settings: CalibrationSettings | None,
) -> str:
    """Fingerprint of a run: every prepared variant (its description, with what calibration chose
    and learned, and its calibrated tensors), the calibration settings and tokens, the exact
    evaluation tokens, and a sample of every weight."""
    described = [h.describe() for h in handles] + [settings.to_dict() if settings else None]
    digest = hashlib.sha256(json.dumps(described).encode())
    digest.update(windows.numpy().tobytes())
    if calibration is not None:
        digest.update(calibration.numpy().tobytes())
    for handle in handles:
        if isinstance(handle, SparsityHandle):
            for tensor in handle.recipe().tensors.values():
                digest.update(tensor.float().cpu().numpy().tobytes())
    weights_digest(model, digest)
    return digest.hexdigest()


def _load_checkpoint(checkpoint: Path | None, key: str) -> dict[str, Any] | None:
    if checkpoint is None or not checkpoint.exists():
        return None
    try:
        state = json.loads(checkpoint.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: a damaged file, start afresh
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    configs: list[Variant | Prepared],
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    calibration_settings: CalibrationSettings | None = None,
    batch_size: int = 1,
) -> list[EvalRow]:
    """Evaluate the dense model and every variant in ``configs`` on ``windows`` (``(W, T)``).

    ``calibration`` windows (from the calibration split) serve the variants that measure something
    first: layer policies, smoothing, learnable corrections (fitted with ``calibration_settings``),
    Wanda and SparseGPT. Variants already prepared (``actsparse.eval.variants.prepare_variants``) are
    used as they are, so tasks and generation can share them.

    Each batch of ``batch_size`` windows runs once dense and once per configuration, so every row
    sees the same tokens and the dense distribution is held for one batch only: memory grows with
    ``batch_size × T × vocabulary`` (the dense probabilities in float32 and one configuration's
    logits in the model's dtype; the figures are summed ``CHUNK`` tokens at a time).
    Batches give the figures of one window at a time, to float rounding. The model is left dense
    afterwards.

    With ``checkpoint``, the running totals are saved there (atomically) after every batch, and a
    run of the same model, windows and configurations resumes from it. It stays after the last
    window, so that a failure or a kill before the results are stored loses nothing (a rerun finds
    every window done and returns at once): delete it once they are (``checkpoint.unlink()``).
    """
    handles = prepare_variants(model, configs, calibration, calibration_settings, progress, batch_size)
    counters = [handle.measure_density() for handle in handles]
    dense, sparse = Totals(), [Totals() for _ in handles]
    key, done = _run_key(model, windows, handles, calibration, calibration_settings), 0
    if state := _load_checkpoint(checkpoint, key):
        done, dense = state["windows_done"], Totals(**state["dense"])
        sparse = [Totals(**saved["totals"]) for saved in state["configs"]]
        for counting, saved in zip(counters, state["configs"]):
            for name, (kept, seen) in saved["counters"].items():
                counting[name].add(kept, seen)
    passes = 1 + len(handles)
    bar = tqdm(
        total=len(windows) * passes,
        initial=done * passes,
        desc="evaluating",
        unit="pass",
        disable=not progress,
    )
    with torch.inference_mode():
        for start in range(done, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            dense_logits = next_token_logits(model, batch)
            targets = batch[:, 1:].flatten()
            reference = dense_reference(dense_logits)
            dense.add(dense_logits, targets, None)
            del dense_logits
            bar.update(len(batch))
            for handle, totals in zip(handles, sparse):
                with handle:
                    totals.add(next_token_logits(model, batch), targets, reference)
                bar.update(len(batch))
            if checkpoint is not None:
                done = start + len(batch)
                write_json_atomic(checkpoint, _checkpoint_state(key, done, dense, counters, sparse))
    bar.close()
    rows = [_row("dense", None, dense, flop_report(model))]
    for handle, totals in zip(handles, sparse):
        rows.append(
            _row(handle.label, handle.describe(), totals, flop_report(model, handle), handle.prepare_seconds)
        )
    return rows


def _checkpoint_state(
    key: str,
    windows_done: int,
    dense: Totals,
    counters: list[dict[str, DensityCounter]],
    sparse: list[Totals],
) -> dict[str, Any]:
    return {
        "key": key,
        "windows_done": windows_done,
        "dense": asdict(dense),
        "configs": [
            {
                "totals": asdict(totals),
                "counters": {name: [counter.kept, counter.seen] for name, counter in counting.items()},
            }
            for counting, totals in zip(counters, sparse)
        ],
    }


def _row(
    label: str,
    config: dict[str, Any] | None,
    totals: Totals,
    flops: Any,
    prepare_seconds: float | None = None,
) -> EvalRow:
    return EvalRow(
        label=label,
        config=config,
        perplexity=math.exp(totals.nll / totals.tokens),
        kl_to_dense=totals.kl / totals.tokens,
        top1_agreement=totals.agree / totals.tokens,
        flops=flops.to_dict(),
        prepare_seconds=prepare_seconds,
    )


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    return {
        "actsparse": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _commit() -> str | None:
    """The git commit actsparse runs from (``-dirty`` with uncommitted changes), or None when it
    was installed from a package (or lies in a checkout of something else)."""
    here = Path(__file__).resolve()
    root = here.parents[3]  # the checkout, if this is its src/actsparse/eval/evaluate.py
    if not (root / ".git").exists() or here != root / "src" / "actsparse" / "eval" / "evaluate.py":
        return None
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=root, capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if described.returncode != 0:
        return None
    return described.stdout.strip() or None


def provenance() -> dict[str, Any]:
    """Where a result comes from: the machine (its CPU and instruction sets, the GPU when there is
    one), the threads, the date, the commit and the command."""
    return {
        "machine": this_cpu().describe(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).date().isoformat(),
        "commit": _commit(),
        "command": _command(),
    }


def _command() -> str:
    """The command line of this process: an ``actsparse`` command, or the Python program that
    called actsparse."""
    if Path(sys.argv[0]).name in {"actsparse", "__main__.py"}:
        return shlex.join(["actsparse", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def provenance_line(source: dict[str, Any], verb: str = "Measured") -> str:
    """``provenance()`` in one sentence, for the foot of a table (``verb``: what was done there)."""
    machine = source["gpu"] or f"{source['machine']}, {source['threads']} threads"
    commit = f", commit {source['commit']}" if source["commit"] else ""
    return f"{verb} on {machine}, {source['date']}{commit}: `{source['command']}`"


def results_document(
    rows: list[EvalRow], model: str, dtype: str, text: dict[str, Any], layer_details: bool = False
) -> dict[str, Any]:
    """The JSON document of one evaluation run: what was evaluated, in which dtype, on what, and
    every figure (with ``layer_details``, each layer's FLOPs and measured sensitivity too)."""
    return {
        "model": model,
        "dtype": dtype,
        "text": text,
        "versions": versions(),
        "provenance": provenance(),
        "rows": [row.to_dict(layer_details) for row in rows],
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def quality_table(rows: list[EvalRow], title: str, source: str = "") -> ResultTable:
    """The rows of one evaluation as a table: quality, FLOPs, and task and generation columns when
    they were measured; ``source`` says where they come from (``provenance_line``)."""
    task_names = list(rows[0].tasks or {})
    generation = any(row.generation for row in rows)
    columns = ["config", "ppl", "KL", "top-1", "sparse FLOPs", "density", "removed"]
    columns += [f"{name} acc (n={rows[0].tasks[name]['n']})" for name in task_names]
    columns += ["gen. ROUGE-L", "gen. identical"] if generation else []
    prepared = any((row.prepare_seconds or 0) >= 1 for row in rows)  # only when some calibration took time
    columns += ["prepared in"] if prepared else []
    cells = []
    for row in rows:
        density, removed = row.flops["measured_density"], row.flops["measured_removed_share"]
        line = [
            row.label,
            f"{row.perplexity:.2f}",
            f"{row.kl_to_dense:.4f}",
            f"{row.top1_agreement:.1%}",
            f"{row.flops['sparse_share']:.1%}",
            "—" if density is None else f"{density:.3f}",
            "—" if removed is None else f"{removed:.1%}",
        ]
        line += [f"{row.tasks[name]['acc']:.1%}" for name in task_names]
        if generation:
            gen = row.generation
            line += (
                ["—", "—"] if gen is None else [f"{gen['mean_rouge_l']:.3f}", f"{gen['identical_share']:.0%}"]
            )
        if prepared:
            line.append(_duration(row.prepare_seconds))
        cells.append(line)
    return ResultTable(title, columns, cells, source)
