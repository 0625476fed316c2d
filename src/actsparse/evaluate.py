"""Quality of sparse configurations against the dense model, over the same token windows.

For every configuration: perplexity, mean KL divergence ``KL(p_dense ‖ p_sparse)`` of the
next-token distribution, and top-1 agreement with the dense model's next-token choice.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm

from actsparse import __version__
from actsparse.config import SparsityConfig
from actsparse.flops import flop_report
from actsparse.sparsify import SparsityHandle, sparsify


@dataclass
class EvalRow:
    """Figures of one configuration (``config`` is None for the dense model)."""

    label: str
    config: SparsityConfig | None
    perplexity: float
    kl_to_dense: float
    top1_agreement: float
    flops: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "config": self.config.to_dict() if self.config else None,
            "perplexity": self.perplexity,
            "kl_to_dense": self.kl_to_dense,
            "top1_agreement": self.top1_agreement,
            "flops": self.flops,
        }


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0

    def add(self, log_probs: torch.Tensor, targets: torch.Tensor, dense_log_probs: torch.Tensor) -> None:
        self.nll += F.nll_loss(log_probs, targets, reduction="sum").item()
        self.kl += F.kl_div(log_probs, dense_log_probs, log_target=True, reduction="sum").item()
        self.agree += int((log_probs.argmax(-1) == dense_log_probs.argmax(-1)).sum())
        self.tokens += targets.numel()


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    logits = model(window[None], use_cache=False).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1)


def evaluate(
    model: nn.Module, windows: torch.Tensor, configs: list[SparsityConfig], progress: bool = True
) -> list[EvalRow]:
    """Evaluate the dense model and every configuration in ``configs`` on ``windows`` (``(W, T)``).

    Each window runs once dense and once per configuration, so every row sees the same tokens and
    the dense distribution never has to be stored. The model is left dense afterwards.
    """
    handles: list[SparsityHandle] = []
    for config in configs:
        handle = sparsify(model, config)
        handle.remove()
        handle.measure_density()
        handles.append(handle)
    dense, sparse = _Totals(), [_Totals() for _ in handles]
    bar = tqdm(total=len(windows) * (1 + len(handles)), desc="evaluating", unit="pass", disable=not progress)
    with torch.inference_mode():
        for window in windows:
            dense_log_probs = _log_probs(model, window)
            targets = window[1:]
            dense.add(dense_log_probs, targets, dense_log_probs)
            bar.update()
            for handle, totals in zip(handles, sparse):
                with handle:
                    totals.add(_log_probs(model, window), targets, dense_log_probs)
                bar.update()
    bar.close()
    rows = [_row("dense", None, dense, flop_report(model))]
    for handle, totals in zip(handles, sparse):
        rows.append(_row(handle.config.label, handle.config, totals, flop_report(model, handle)))
    return rows


def _row(label: str, config: SparsityConfig | None, totals: _Totals, flops: Any) -> EvalRow:
    return EvalRow(
        label=label,
        config=config,
        perplexity=math.exp(totals.nll / totals.tokens),
        kl_to_dense=totals.kl / totals.tokens,
        top1_agreement=totals.agree / totals.tokens,
        flops=flops.to_dict(),
    )


def versions() -> dict[str, str]:
    """Versions of the software that produced a result."""
    return {
        "actsparse": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def results_document(rows: list[EvalRow], model: str, text: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of one evaluation run: what was evaluated, on what, and every figure."""
    return {"model": model, "text": text, "versions": versions(), "rows": [row.to_dict() for row in rows]}
