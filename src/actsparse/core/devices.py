"""Where a model runs: ``--device`` and ``--device-map``, and the few helpers with which every stage
follows the model's devices.

A model sits on one device (``device="cuda:0"``), or is spread by accelerate over several
(``device_map="auto"``: layers over the GPUs, the rest in CPU memory or on disk). Spread models
carry accelerate's hooks, which move each module's inputs to its device and load offloaded weights
just for its call. actsparse keeps them working: token ids go to the device of the input
embeddings (``input_device``), a layer replaced by a ``SparseLinear`` takes over the original's
hook (``carry_hook``), and code that reads an offloaded layer's weights outside a call loads them
for a moment (``materialized``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from actsparse.core.errors import ActsparseError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
"""The placements accelerate computes for ``--device-map`` (a dict is accepted from Python)."""


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names: ``auto`` (the first CUDA GPU if PyTorch sees one, else the CPU),
    ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device that is absent here is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ActsparseError(f"Unknown device '{name}'; choose auto, cpu, cuda, cuda:N or mps.")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ActsparseError(
                f"Device '{name}' was asked for but PyTorch sees no CUDA GPU here (a CPU build of "
                "torch, or no driver); use --device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ActsparseError(
                f"Device '{name}' does not exist: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ActsparseError(
            f"Device '{name}' is not available here (no Apple GPU); use --device cpu or auto."
        )
    return device


def check_device_map(device_map: str | dict[str, Any] | None, device: str) -> None:
    """Refuse an unknown ``--device-map``, or one given together with a ``--device`` other than auto."""
    if device_map is None:
        return
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ActsparseError(f"Unknown device map '{device_map}'; choose one of {', '.join(DEVICE_MAPS)}.")
    if device != "auto":
        raise ActsparseError(
            f"--device {device} and --device-map {device_map} both place the model; give one of them."
        )


def _align_hook(module: nn.Module) -> Any | None:
    """accelerate's ``AlignDevicesHook`` on ``module`` (alone or inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):
        if hasattr(candidate, "execution_device"):
            return candidate
    return None


def offloaded(module: nn.Module) -> bool:
    """True when ``module``'s own weights live in CPU memory or on disk between its calls."""
    hook = _align_hook(module)
    return bool(hook is not None and hook.offload)


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its hook's execution device, else that of its first tensor."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        device = hook.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where a model's token ids go: the device of its input embeddings."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


@contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its offloaded weights loaded on its execution device for the body (nothing
    happens for a module whose weights stay in place)."""
    hook = _align_hook(module)
    if hook is None or not hook.offload:
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


class _LayerTensors(Mapping):
    """What an offloaded ``SparseLinear`` loads for each call: the tensors it derived itself
    (smoothed or quantised weights, kept in CPU memory), else the original layer's offloaded ones."""

    def __init__(self, original: Mapping, own: dict[str, torch.Tensor]) -> None:
        self.original, self.own = original, own

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.own[key] if key in self.own else self.original[key]

    def __contains__(self, key: object) -> bool:
        return key in self.own or key in self.original

    def __iter__(self) -> Iterator[str]:
        return iter({*self.own, *self.original})

    def __len__(self) -> int:
        return len({*self.own, *self.original})


def carry_hook(original: nn.Module, replacement: nn.Module, own: dict[str, torch.Tensor]) -> None:
    """Give ``replacement`` (which takes ``original``'s place) a copy of ``original``'s accelerate
    hook, so it computes on the same device and, when offloaded, loads its weights for each call;
    ``own`` are the tensors it derived itself (by parameter name), loaded instead of the original's."""
    hook = _align_hook(original)
    if hook is None:
        return
    from accelerate.hooks import add_hook_to_module

    carried = copy.copy(hook)
    if hook.offload and hook.weights_map is not None:
        carried.weights_map = _LayerTensors(hook.weights_map, {k: v.detach().cpu() for k, v in own.items()})
        carried.tied_params_names = set()
    add_hook_to_module(replacement, carried)
