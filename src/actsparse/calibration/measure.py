"""Calibration statistics: run the dense model over calibration windows and hand every chosen
layer's input to an observer (for sensitivities, smoothing maxima, Wanda norms, SparseGPT Hessians)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from actsparse.core.devices import input_device
from actsparse.core.errors import ActsparseError
from actsparse.core.paths import cache_dir, write_json_atomic

T = TypeVar("T")


def weights_digest(model: nn.Module, digest: Any) -> None:
    """Feed ``digest`` (a hashlib object) every parameter's name, dtype and shape and its first 64
    values (offloaded weights, on the meta device, are named and shaped only)."""
    for name, parameter in model.named_parameters():
        digest.update(f"{name} {parameter.dtype} {tuple(parameter.shape)}".encode())
        if parameter.device.type != "meta":
            digest.update(parameter.detach().flatten()[:64].float().cpu().numpy().tobytes())


def measurements_dir() -> Path:
    """Where measurements worth keeping across runs are stored: ``measurements/`` in the cache."""
    return cache_dir() / "measurements"


class Measurements:
    """Statistics of the dense model on one set of calibration windows, each computed once and
    shared by every variant prepared with them (sensitivities, smoothing maxima).

    ``get(key, compute)`` returns the value stored under ``key`` (any JSON-ready description of
    what is measured), calling ``compute(windows)`` the first time; measurements run the model on
    ``batch_size`` windows at a time. ``get(key, compute, stored=model)`` also keeps a JSON-ready
    value in the cache folder (``measurements/``), under the key, the model's weights and the
    windows' tokens, so a later run with the same model, windows and key reads it back; with
    ``reads=n`` only the first ``n`` windows' tokens count, for a measurement that reads no more.
    """

    def __init__(self, windows: torch.Tensor | None, batch_size: int = 1) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self._values: dict[str, Any] = {}

    def get(
        self,
        key: Any,
        compute: Callable[[torch.Tensor | None], T],
        stored: nn.Module | None = None,
        reads: int | None = None,
    ) -> T:
        text = json.dumps(key, sort_keys=True)
        if text not in self._values:
            path = None
            if stored is not None and self.windows is not None:
                path = self._stored_path(text, stored, self.windows[:reads])
            if path is not None and path.exists():
                self._values[text] = json.loads(path.read_text(encoding="utf-8"))["value"]
            else:
                self._values[text] = compute(self.windows)
                if path is not None:
                    write_json_atomic(path, {"key": key, "value": self._values[text]})
        return self._values[text]

    def statistic(
        self, name: str, model: nn.Module, layers: dict[str, nn.Linear], purpose: str
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {name: tensor}}`` of the statistic ``name`` (one of ``STATISTICS``) of the dense
        model's inputs to ``layers``, measured once per these measurements and shared by every
        variant; ``purpose`` names the need in messages."""
        observe = STATISTICS[name]
        values = self.get(
            (name, sorted(layers)),
            lambda windows: observe(model, windows, layers, purpose, self.batch_size),
        )
        return {layer: {name: value} for layer, value in values.items()}

    @staticmethod
    def _stored_path(key: str, model: nn.Module, windows: torch.Tensor) -> Path:
        digest = hashlib.sha256(key.encode())
        digest.update(windows.numpy().tobytes())
        weights_digest(model, digest)
        return measurements_dir() / f"{digest.hexdigest()}.json"


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


def input_mean_square(
    model: nn.Module,
    windows: torch.Tensor | None,
    layers: dict[str, nn.Linear],
    purpose: str,
    batch_size: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-input-channel mean of ``X_:,j²`` of every layer over the calibration windows' tokens."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        current = x.float().square().sum(dim=0)
        sums[name] = current if name not in sums else sums[name] + current
        counts[name] = counts.get(name, 0) + x.shape[0]

    observe_inputs(model, windows, layers, observe, purpose, batch_size=batch_size)
    return {name: total / counts[name] for name, total in sums.items()}


STATISTICS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "input_max": input_abs_max,
    "input_mean_square": input_mean_square,
}
"""The per-channel input statistics a correction's ``measure`` may ask for, by name."""
