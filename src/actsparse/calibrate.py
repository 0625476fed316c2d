"""Block-wise calibration of the learned corrections (``mitigation="learnable"``).

Decoder block by decoder block, the corrections of the block's sparse layers are fitted so that
the sparse block, fed the output of the already-calibrated sparse blocks before it, reproduces the
dense model's output of that block (mean squared error; AdamW with warm-up and gradient clipping).
Only two sets of block activations are held at a time: the dense path and the sparse path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from actsparse.devices import input_device
from actsparse.errors import ActsparseError

if TYPE_CHECKING:
    from actsparse.handle import SparsityHandle
    from actsparse.layers import SparseLinear


@dataclass(frozen=True)
class CalibrationSettings:
    """How the learned corrections are fitted.

    Args:
        steps: optimiser steps per block, one calibration window each (batch 1); None means one
            pass over the calibration windows.
        lr: peak learning rate of AdamW (betas 0.9, 0.95; no weight decay).
        warmup: share of the steps over which the learning rate rises linearly (then cosine decay).
        clip: maximum gradient norm.
        explode: a step loss this many times the block's loss before calibration (or 0.1% of the
            mean square of its dense output, if that is larger) stops the run.

    A block whose corrections end with a larger error on the calibration windows than it started
    with gets its corrections reset (``BlockFit.kept`` is False), so calibration never makes a
    block worse on the data it sees.
    """

    steps: int | None = None
    lr: float = 5e-3
    warmup: float = 0.03
    clip: float = 1.0
    explode: float = 100.0

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ActsparseError(
                f"Calibration steps {self.steps} must be at least 1 (or omitted for one pass)."
            )
        if not self.lr > 0:
            raise ActsparseError(f"Learning rate {self.lr:g} must be positive; use e.g. 1e-3.")
        if not 0 <= self.warmup < 1:
            raise ActsparseError(f"Warm-up share {self.warmup:g} is outside [0, 1); use e.g. 0.03.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BlockFit:
    """Mean squared error of one block's sparse output to the dense target, before and after."""

    block: str
    loss_before: float
    loss_after: float
    steps: int
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopForward(Exception):
    """Raised by a hook once the first block's input is captured; the rest of the model is skipped."""


def decoder_blocks(model: nn.Module, layer_names: list[str]) -> dict[str, nn.Module]:
    """The decoder blocks holding ``layer_names``, in order: the items of the ``nn.ModuleList`` (as
    in transformers' Llama, Gemma, Qwen2, Mistral) whose elements contain those layers."""
    for list_name, blocks in model.named_modules():
        if not isinstance(blocks, nn.ModuleList) or not list_name:
            continue
        prefix = list_name + "."
        if layer_names and all(name.startswith(prefix) for name in layer_names):
            return {f"{prefix}{index}": block for index, block in enumerate(blocks)}
    raise ActsparseError(
        "Block-wise calibration needs the decoder blocks in one nn.ModuleList (as in transformers' "
        "Llama, Gemma or Qwen2 models); this model has none holding all sparse layers, so use a "
        "training-free mitigation."
    )


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def _block_inputs(
    model: nn.Module, blocks: dict[str, nn.Module], windows: torch.Tensor
) -> tuple[torch.Tensor, dict[str, dict[str, Any]]]:
    """The first block's input for every window ``(W, T, hidden)``, and every block's keyword
    arguments (masks, position embeddings), which are the same for all windows of one length."""
    keyword_args: dict[str, dict[str, Any]] = {}
    inputs: list[torch.Tensor] = []
    first = next(iter(blocks.values()))

    def keep_kwargs(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            keyword_args.setdefault(name, dict(kwargs))

        return hook

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(args[0][0])
        if len(inputs) > 1:
            raise _StopForward

    hooks = [
        block.register_forward_pre_hook(keep_kwargs(name), with_kwargs=True) for name, block in blocks.items()
    ]
    hooks.append(first.register_forward_pre_hook(keep_input, with_kwargs=True))
    device = input_device(model)
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(window[None].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(inputs), keyword_args


def _run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([_output(block(x[None], **kwargs))[0] for x in inputs])


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return F.mse_loss(outputs.float(), targets.float()).item()


def _fit_block(
    name: str,
    block: nn.Module,
    parameters: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    settings: CalibrationSettings,
    reference: float,
    progress: bool,
) -> int:
    """Fit ``parameters`` on the windows, one per step; returns the number of steps taken."""
    steps = settings.steps or len(inputs)
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(settings.warmup * steps), steps)
    # Gradients flow to the corrections only: the model's own weights are frozen meanwhile.
    frozen = [p for p in block.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc=name, unit="step", disable=not progress, leave=False):
                index = step % len(inputs)
                output = _output(block(inputs[index][None], **kwargs))
                loss = F.mse_loss(output.float(), targets[index][None].float())
                value = loss.item()
                if not math.isfinite(value) or value > settings.explode * reference:
                    raise ActsparseError(
                        f"Calibration of block {name} diverged at step {step + 1} (loss {value:.3g} against "
                        f"{reference:.3g} at the start); lower the learning rate (--lr), "
                        "or check the model runs in float32."
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
        for parameter in frozen:
            parameter.requires_grad_(True)
    return steps


def _calibrate_block(
    name: str,
    block: nn.Module,
    parameters: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    settings: CalibrationSettings,
    progress: bool,
) -> tuple[BlockFit, torch.Tensor]:
    """Fit one block's corrections; keep them only if they lower its error. Returns the fit and
    the block's sparse outputs (the next block's inputs)."""
    start_outputs = _run_block(block, inputs, kwargs)
    before = _mse(start_outputs, targets)
    if not parameters:
        return BlockFit(name, before, before, 0, False), start_outputs
    start = [parameter.detach().clone() for parameter in parameters]
    reference = max(before, 1e-3 * targets.float().square().mean().item())
    steps = _fit_block(name, block, parameters, inputs, targets, kwargs, settings, reference, progress)
    outputs = _run_block(block, inputs, kwargs)
    after = _mse(outputs, targets)
    if after <= before:
        return BlockFit(name, before, after, steps, True), outputs
    with torch.no_grad():
        for parameter, value in zip(parameters, start):
            parameter.copy_(value)
    return BlockFit(name, before, before, steps, False), start_outputs


def learn_corrections(
    handle: SparsityHandle,
    windows: torch.Tensor | None,
    settings: CalibrationSettings | None = None,
    progress: bool = True,
) -> list[BlockFit]:
    """Fit the learned corrections of ``handle``'s layers block by block on ``windows`` (the
    calibration split); ``actsparse.sparsify.fold`` then folds them into the layers. The model's
    own weights never change, and the handle is attached again at the end."""
    if windows is None or len(windows) == 0:
        raise ActsparseError(
            "Learnable corrections need calibration text; pass calibration windows (--calib-windows)."
        )
    settings = settings or CalibrationSettings()
    corrected: dict[str, SparseLinear] = {
        name: layer for name, layer in handle.layers.items() if layer.correction is not None
    }
    blocks = decoder_blocks(handle.model, list(corrected))
    handle.remove()
    dense_inputs, kwargs = _block_inputs(handle.model, blocks, windows)
    sparse_inputs = dense_inputs
    fits = []
    bar = tqdm(blocks.items(), desc="calibrating", unit="block", disable=not progress)
    for block_name, block in bar:
        targets = _run_block(block, dense_inputs, kwargs[block_name])
        handle.attach()
        parameters = [
            parameter
            for name, layer in corrected.items()
            if name.startswith(block_name + ".")
            for parameter in layer.correction.parameters()
        ]
        fit, sparse_inputs = _calibrate_block(
            block_name, block, parameters, sparse_inputs, targets, kwargs[block_name], settings, progress
        )
        fits.append(fit)
        bar.set_postfix_str(f"MSE {fit.loss_before:.3g} → {fit.loss_after:.3g}")
        dense_inputs = targets
        handle.remove()
    handle.attach()
    return fits
