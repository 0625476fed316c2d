"""Fitting of the learned corrections (``corrections="learnable"``), by one of three objectives.

- ``block-mse``: decoder block by decoder block, the corrections of the block's sparse layers are
  fitted so that the sparse block, fed the output of the already-calibrated sparse blocks before
  it, reproduces the dense model's output of that block (mean squared error on the residual
  stream). Only two sets of block activations are held at a time: the dense path and the sparse path.
- ``block-normed``: the same, with both outputs passed through the norm that reads the block's
  output next (the next block's input norm, or the final norm), so the error is measured as the
  next layers see it rather than spent on the few residual channels of huge magnitude that the
  norm divides away.
- ``output-kl``: all corrections at once, end to end, on the KL divergence of the model's
  next-token distribution from the dense one (the dense distribution recomputed for every step).

All use AdamW with warm-up, cosine decay and gradient clipping, one calibration window per step.
The last calibration windows are held out of the fit to judge it: the corrections end at the point
of the fit where the objective on those windows was least, so what is kept also helps on text the
fit did not see (and nothing is kept when nothing helped). Given several learning rates, the fit
runs once per rate from the same start and the held-out objective picks among all of them (a rate
search: which rate suits a model is not known in advance).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from actsparse.config import CalibrationSettings
from actsparse.core.devices import input_device
from actsparse.core.errors import ActsparseError
from actsparse.pieces.corrections import OBJECTIVES
from actsparse.sparse.handle import SparsityHandle


def settings_for(
    settings: CalibrationSettings, objective: str, windows: int, learn: str = "input"
) -> CalibrationSettings:
    """``settings`` with the steps and learning rate left open taken from ``objective`` (one of
    ``OBJECTIVES``), for ``windows`` calibration windows (the passes are over the windows fitted
    on) and the parts ``learn`` fits."""
    defaults = OBJECTIVES[objective]
    steps = settings.steps or defaults.passes * len(settings.split(windows)[0])
    return replace(settings, steps=steps, lr=settings.lr or defaults.lr_for(learn))


@dataclass(frozen=True)
class BlockFit:
    """The objective on the held-out calibration windows of one block (or of the whole model,
    ``block="model"`` for ``output-kl``) before its fit and as kept, the steps run per rate, the
    step whose corrections were kept (0: none helped, the corrections are as they started), the
    learning rate of the fit they were kept from (None when none helped), and for every rate
    fitted its least held-out objective (None when it diverged before its first check)."""

    block: str
    loss_before: float
    loss_after: float
    steps: int
    kept_step: int
    lr: float | None = None
    by_rate: tuple[tuple[float, float | None], ...] = ()

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
        "training-free correction."
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


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A block objective: ``loss(sparse_output, dense_output)``."""


def _mse(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(sparse.float(), dense.float())


def _normed_mse(norm: nn.Module) -> Loss:
    """Mean squared error of both outputs as ``norm`` passes them on."""
    return lambda sparse, dense: _mse(norm(sparse), norm(dense))


def _kl(sparse_logits: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """KL(dense ‖ sparse) of the next-token distributions, averaged over tokens."""
    vocabulary = dense_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(sparse_logits.float().reshape(-1, vocabulary), dim=-1),
        F.log_softmax(dense_logits.float().reshape(-1, vocabulary), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


@contextmanager
def _training_only(model: nn.Module, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Gradients flow to ``parameters`` only: the model's own weights are frozen meanwhile."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
        for parameter in frozen:
            parameter.requires_grad_(True)


def _fit(
    name: str,
    parameters: list[nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    held_loss: Callable[[], float],
    settings: CalibrationSettings,
    scale: float,
    progress: bool,
) -> BlockFit:
    """``settings.steps`` AdamW steps on ``step_loss(step)`` from the same start at every rate of
    ``settings.rates``, checked ``settings.checks`` times on ``held_loss()``; ``parameters`` end as
    they were at the best check of all (the start if none was better). A step loss far above the
    start (or ``scale``, if larger) ends that rate's run; it is an error when it ends the only one."""
    steps, rates = settings.steps, settings.rates
    where = "the model" if name == "model" else f"block {name}"
    start = [parameter.detach().clone() for parameter in parameters]
    before = best = held_loss()
    kept_step, kept_rate, kept = 0, None, start
    checkpoints = {math.ceil(steps * check / settings.checks) for check in range(1, settings.checks + 1)}
    diverged, by_rate = [], []
    for rate in rates:
        rate_best = None
        with torch.no_grad():
            for parameter, value in zip(parameters, start):
                parameter.copy_(value)
        optimizer = torch.optim.AdamW(parameters, lr=rate, betas=(0.9, 0.95), weight_decay=0.0)
        schedule = get_cosine_schedule_with_warmup(optimizer, round(settings.warmup * steps), steps)
        desc = name if len(rates) == 1 else f"{name} lr={rate:g}"
        for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
            loss = step_loss(step)
            value = loss.item()
            if not math.isfinite(value) or value > settings.explode * max(before, scale):
                diverged.append(
                    f"at lr {rate:g}, step {step + 1} (loss {value:.3g} against {before:.3g} at the start)"
                )
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step + 1 not in checkpoints:
                continue
            held = held_loss()
            rate_best = held if rate_best is None else min(rate_best, held)
            if held < best:
                best, kept_step, kept_rate = held, step + 1, rate
                kept = [parameter.detach().clone() for parameter in parameters]
        optimizer.zero_grad(set_to_none=True)
        by_rate.append((rate, rate_best))
    if len(diverged) == len(rates):
        raise ActsparseError(
            f"Calibration of {where} diverged {'; '.join(diverged)}; lower the learning rate (--lr), "
            "or check the model runs in float32."
        )
    if diverged:
        tqdm.write(f"Calibration of {where} diverged {'; '.join(diverged)}; the other rates' fits stand.")
    with torch.no_grad():
        for parameter, value in zip(parameters, kept):
            parameter.copy_(value)
    return BlockFit(name, before, best, steps, kept_step, kept_rate, tuple(by_rate))


def _calibrate_block(
    name: str,
    block: nn.Module,
    parameters: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    loss: Loss,
    settings: CalibrationSettings,
    progress: bool,
) -> tuple[BlockFit, torch.Tensor]:
    """Fit one block's corrections on ``loss`` over the fitted windows, judged on the held-out
    ones. Returns the fit and the block's sparse outputs (the next block's inputs)."""
    fitted, held = settings.split(len(inputs))

    def held_loss() -> float:
        return loss(_run_block(block, inputs[held], kwargs), targets[held]).item()

    if not parameters:
        return BlockFit(name, held_loss(), held_loss(), 0, 0), _run_block(block, inputs, kwargs)
    with torch.no_grad():
        scale = 1e-3 * loss(torch.zeros_like(targets), targets).item()  # of the dense output's own size

    def step_loss(step: int) -> torch.Tensor:
        index = fitted[step % len(fitted)]
        return loss(_output(block(inputs[index][None], **kwargs)), targets[index][None])

    fit = _fit(name, parameters, step_loss, held_loss, settings, scale, progress)
    return fit, _run_block(block, inputs, kwargs)


def _reading_norms(
    model: nn.Module, blocks: dict[str, nn.Module], window: torch.Tensor
) -> dict[str, nn.Module]:
    """For every block, the norm module that first reads its output (the next block's input norm,
    the final norm after the last block), found by running the dense model once on ``window``."""
    calls: list[tuple[str, Any]] = []
    norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
    hooks = [
        block.register_forward_hook(lambda *_, name=name: calls.append(("block", name)))
        for name, block in blocks.items()
    ]
    hooks += [
        norm.register_forward_pre_hook(lambda module, _: calls.append(("norm", module))) for norm in norms
    ]
    try:
        with torch.no_grad():
            model(window[None].to(input_device(model)), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    reading: dict[str, nn.Module] = {}
    for index, (kind, what) in enumerate(calls):
        if kind == "block":
            reader = next((module for k, module in calls[index + 1 :] if k == "norm"), None)
            if reader is None:
                raise ActsparseError(
                    f"No norm reads the output of block {what}, so objective=block-normed does not "
                    "apply to this model; use objective=block-mse or output-kl."
                )
            reading[what] = reader
    return reading


def _learn_block_by_block(
    handle: SparsityHandle,
    learned: dict[str, list[nn.Parameter]],
    windows: torch.Tensor,
    settings: CalibrationSettings,
    normed: bool,
    progress: bool,
) -> list[BlockFit]:
    """``block-mse`` (``normed`` False) and ``block-normed``: one block after the other, each
    fed the output of the calibrated sparse blocks before it."""
    blocks = decoder_blocks(handle.model, list(learned))
    handle.remove()
    dense_inputs, kwargs = _block_inputs(handle.model, blocks, windows)
    readers = _reading_norms(handle.model, blocks, windows[0]) if normed else {}
    sparse_inputs = dense_inputs
    fits = []
    bar = tqdm(blocks.items(), desc="calibrating", unit="block", disable=not progress)
    for block_name, block in bar:
        targets = _run_block(block, dense_inputs, kwargs[block_name])
        handle.attach()
        parameters = [
            parameter
            for name, layer_parameters in learned.items()
            if name.startswith(block_name + ".")
            for parameter in layer_parameters
        ]
        loss = _normed_mse(readers[block_name]) if normed else _mse
        with _training_only(handle.model, parameters):
            fit, sparse_inputs = _calibrate_block(
                block_name,
                block,
                parameters,
                sparse_inputs,
                targets,
                kwargs[block_name],
                loss,
                settings,
                progress,
            )
        fits.append(fit)
        bar.set_postfix_str(f"loss {fit.loss_before:.3g} → {fit.loss_after:.3g}")
        dense_inputs = targets
        handle.remove()
    handle.attach()
    return fits


def _learn_end_to_end(
    handle: SparsityHandle,
    learned: dict[str, list[nn.Parameter]],
    windows: torch.Tensor,
    settings: CalibrationSettings,
    progress: bool,
) -> list[BlockFit]:
    """``output-kl``: every correction at once, one fitted window per step, judged by the mean KL
    over the held-out windows."""
    model, device = handle.model, input_device(handle.model)
    parameters = [p for layer_parameters in learned.values() for p in layer_parameters]
    fitted, held = settings.split(len(windows))

    def window_kl(index: int) -> torch.Tensor:
        tokens = windows[index][None].to(device)
        handle.remove()
        with torch.no_grad():
            dense = model(tokens, use_cache=False).logits
        handle.attach()
        return _kl(model(tokens, use_cache=False).logits, dense)

    def held_kl() -> float:
        with torch.no_grad():
            return sum(window_kl(index).item() for index in held) / len(held)

    with _training_only(model, parameters):
        fit = _fit(
            "model",
            parameters,
            lambda step: window_kl(fitted[step % len(fitted)]),
            held_kl,
            settings,
            1e-3,
            progress,
        )
    return [fit]


def learn_corrections(
    handle: SparsityHandle,
    learned: dict[str, list[nn.Parameter]],
    windows: torch.Tensor | None,
    settings: CalibrationSettings | None = None,
    objective: str = "output-kl",
    learn: str = "input",
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the ``learned`` parameters (by layer name) of ``handle``'s layers on ``windows`` (the
    calibration split) by ``objective`` (one of ``OBJECTIVES``), the parts ``learn`` names at the
    rate it defaults to; ``actsparse.pipeline.phases.fold`` then folds them into the layers. The
    model's own weights never change, and the handle is attached again at the end. Returns the
    calibration record: the settings as run (defaults resolved) and every fit (``BlockFit``)."""
    if windows is None or len(windows) == 0:
        raise ActsparseError(
            "Learnable corrections need calibration text; pass calibration windows (--calib-windows)."
        )
    settings = settings_for(settings or CalibrationSettings(), objective, len(windows), learn)
    if objective == "output-kl":
        fits = _learn_end_to_end(handle, learned, windows, settings, progress)
    else:
        normed = objective == "block-normed"
        fits = _learn_block_by_block(handle, learned, windows, settings, normed, progress)
    return {"settings": settings.to_dict(), "blocks": [fit.to_dict() for fit in fits]}


@dataclass(frozen=True)
class Fitter:
    """The fitting a learned correction's ``fit`` hands its parameters to: ``handle``'s model on the
    calibration ``windows`` with ``settings`` (``actsparse.pieces.base.Fitter``)."""

    handle: SparsityHandle
    windows: torch.Tensor | None
    settings: CalibrationSettings

    def fit(self, parameters: dict[str, list[nn.Parameter]], objective: str, learn: str) -> dict[str, Any]:
        return learn_corrections(self.handle, parameters, self.windows, self.settings, objective, learn)
