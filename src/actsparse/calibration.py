"""Calibration statistics: run the dense model over calibration windows and hand every chosen
layer's input to an observer (for sensitivities, smoothing maxima, Wanda norms, SparseGPT Hessians)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.devices import input_device
from actsparse.errors import ActsparseError

T = TypeVar("T")


class Measurements:
    """Statistics of the dense model on one set of calibration windows, each computed once and
    shared by every variant prepared with them (sensitivities, smoothing maxima).

    ``get(key, compute)`` returns the value stored under ``key`` (any JSON-ready description of
    what is measured), calling ``compute(windows)`` the first time; measurements run the model on
    ``batch_size`` windows at a time.
    """

    def __init__(self, windows: torch.Tensor | None, batch_size: int = 1) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self._values: dict[str, Any] = {}

    def get(self, key: Any, compute: Callable[[torch.Tensor | None], T]) -> T:
        text = json.dumps(key, sort_keys=True)
        if text not in self._values:
            self._values[text] = compute(self.windows)
        return self._values[text]


def observe_inputs(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    observe: Callable[[str, torch.Tensor], None],
    purpose: str,
    progress: bool = True,
    batch_size: int = 1,
) -> None:
    """Run ``model`` on the calibration windows, ``batch_size`` at a time; call
    ``observe(name, x)`` with every input ``x`` (``(tokens, in)``, the batch's tokens together) that
    reaches ``layers[name]``. ``purpose`` names the need in messages."""
    if windows is None or len(windows) == 0:
        raise ActsparseError(
            f"{purpose} needs calibration text; pass calibration windows (--calib-windows in the CLI)."
        )
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, name=name: observe(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, layer in layers.items()
    ]
    try:
        device = input_device(model)
        with torch.inference_mode():
            for batch in tqdm(
                windows.split(batch_size), desc=purpose, unit="batch", disable=not progress, leave=False
            ):
                model(batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()


def input_abs_max(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    purpose: str,
    batch_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |X_:,j|`` of every layer over the calibration windows."""
    maxima: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        current = x.abs().amax(dim=0).float()
        maxima[name] = current if name not in maxima else torch.maximum(maxima[name], current)

    observe_inputs(model, windows, layers, observe, purpose, batch_size=batch_size)
    return maxima
