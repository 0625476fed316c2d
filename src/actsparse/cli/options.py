"""The options of the commands, each declared once: the run options (model, texts, windows,
dtype, device, batches, fitting) in ``RUN_OPTIONS``, the config settings from
``actsparse.config.config_settings``, and the options of `eval` and `sweep` alone. A command takes
them with ``@run_options(...)``, ``@config_options(...)`` and ``@option_group(...)`` and receives
each group as one object (``RunOptions``, ``ConfigOptions``, ``EvalOptions``, ``SweepOptions``)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from transformers import PreTrainedTokenizerBase

from actsparse.config import CalibrationSettings, SparsityConfig, config_settings, configs_from_settings
from actsparse.core.devices import resolve_device
from actsparse.core.errors import ActsparseError
from actsparse.core.paths import check_file_target, check_writable
from actsparse.eval.variants import Variant
from actsparse.io.models import DTYPES, load_model, resolve_dtype
from actsparse.io.recipe import Recipe
from actsparse.io.text import TextPart, WindowSample, calibration_text, calibration_windows, evaluation_text
from actsparse.pieces.base import BACKENDS


def split(text: str) -> list[str]:
    """The comma-separated parts of ``text``, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class RunOptions:
    """What a command runs on: the model and how it loads, the texts, the calibration windows, the
    batch size, and how learned corrections are fitted (``--calib-steps``, ``--lr``,
    ``--calib-holdout``). A command given fewer of them keeps these defaults for the rest."""

    model: str = "smollm2-135m"
    dataset: str = "sotu"
    calib_dataset: str | None = None
    seqlen: int = 512
    calib_windows: int = 16
    calib_sample: WindowSample = "spread"
    calib_steps: int | None = None
    lr: str | None = None
    calib_holdout: float = 0.25
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | None = None
    batch_size: int = 1

    def calibration_settings(self) -> CalibrationSettings:
        """The fitting settings of ``--calib-steps``, ``--lr`` (one rate or comma-separated rates)
        and ``--calib-holdout``."""
        try:
            rates = tuple(float(rate) for rate in split(self.lr)) if self.lr is not None else None
        except ValueError:
            raise ActsparseError(
                f"--lr '{self.lr}' is not a learning rate; give a number (1e-3) or comma-separated "
                "numbers (1e-3,1e-4)."
            ) from None
        return CalibrationSettings(steps=self.calib_steps, lr=rates, holdout=self.calib_holdout)

    def checked_dtype(self, variants: list[Variant]) -> str:
        """The dtype the model will load in (``auto`` resolved); a backend that cannot compute the
        model in it on the device is refused before the model loads."""
        dtype = resolve_dtype(self.dtype, self.device)
        for variant in variants:
            sparsity = variant.config if isinstance(variant, Recipe) else variant
            if isinstance(sparsity, SparsityConfig):
                refusal = BACKENDS.get(sparsity.backend).dtype_refusal(
                    DTYPES[dtype], resolve_device(self.device)
                )
                if refusal:
                    raise ActsparseError(refusal)
        return dtype

    def load(self, dtype: str, longest: int | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """The model in ``dtype`` and its tokenizer, for windows of up to ``longest`` tokens
        (``seqlen`` by default)."""
        return load_model(self.model, dtype, longest or self.seqlen, self.device, self.device_map)

    def texts(self) -> tuple[TextPart, TextPart]:
        """The evaluation text and the text that calibrates, each checked (and the pair refused when
        the calibration file is the evaluation text) before any work."""
        return evaluation_text(self.dataset), calibration_text(self.dataset, self.calib_dataset)

    def calibration(
        self, tokenizer: PreTrainedTokenizerBase, part: TextPart
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The calibration windows cut from ``part`` and the description of what they were cut from."""
        return calibration_windows(tokenizer, part, self.seqlen, self.calib_windows, self.calib_sample)


RUN_OPTIONS: dict[str, Any] = {
    "model": typer.Option(help="Embedded name (see `actsparse models`), Hub id, model folder or .gguf file."),
    "dataset": typer.Option(
        help="sotu, emails, wikitext2, or a text file (a file's first quarter is its calibration split, "
        "the rest its evaluation split)."
    ),
    "calib_dataset": typer.Option(
        help="Text that calibrates: sotu, emails, wikitext2 (their calibration splits) or another text "
        "file (used whole); default: the calibration split of --dataset."
    ),
    "seqlen": typer.Option(min=2, help="Tokens per window, BOS included."),
    "calib_windows": typer.Option(
        min=1, help="Calibration windows for policies, smoothing, learnable corrections, Wanda, SparseGPT."
    ),
    "calib_sample": typer.Option(
        help="Which windows --calib-windows takes of the calibration text: spread (evenly from its start "
        "to its end) or start (its first windows).",
    ),
    "calib_steps": typer.Option(
        min=1,
        help="Learnable corrections: optimiser steps (per block for the block objectives; default: one pass "
        "over the fitted windows for those, two for output-kl).",
    ),
    "lr": typer.Option(
        metavar="LR[,LR...]",
        help="Learnable corrections: peak AdamW learning rate (default: 5e-3 for the block objectives, 1e-3 "
        "for output-kl, 1e-4 for it with learn=input+output); several comma-separated rates (1e-3,1e-4) "
        "search: each is fitted and the fit best on the held-out calibration windows kept.",
    ),
    "calib_holdout": typer.Option(
        "--calib-holdout",
        help="Learnable corrections: share of the calibration windows held out of the fit to judge it; "
        "the corrections are kept as they were where the objective on them was least (0: judge on the "
        "fitted windows).",
    ),
    "dtype": typer.Option(
        help="float32, bfloat16, float16, or auto: bfloat16 where the device computes it fast (CUDA; "
        "a CPU with AMX or AVX512-BF16), float32 elsewhere."
    ),
    "device": typer.Option(
        help="auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps."
    ),
    "device_map": typer.Option(
        help="Spread a model too large for one device with accelerate: auto, balanced, balanced_low_0 "
        "or sequential (layers over the GPUs, the rest in CPU memory, then on disk in the actsparse cache)."
    ),
    "batch_size": typer.Option(
        min=1,
        help="Windows per forward pass (evaluation and calibration statistics); memory grows with "
        "batch × seqlen × vocabulary.",
    ),
}
"""Every run option's command-line declaration, by ``RunOptions`` field."""

LOADING = ("model", "dtype", "device", "device_map", "seqlen")
TEXTS = ("dataset", "calib_dataset", "calib_windows", "calib_sample")
FITTING = ("calib_steps", "lr", "calib_holdout")
BATCHES = ("batch_size",)


def _with_parameters(
    command: Callable[..., Any], taken: str, added: list[inspect.Parameter], build: Callable[[dict], Any]
) -> Callable[..., Any]:
    """``command`` with its parameter ``taken`` replaced by the options ``added``: the wrapper
    gives ``command`` ``build(values of added)`` as ``taken``."""
    signature = inspect.signature(command, eval_str=True)
    parameters = [p for p in signature.parameters.values() if p.name != taken]
    names = [p.name for p in added]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names}
        return command(**{taken: build(values)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters + added)  # type: ignore[attr-defined]
    return wrapper


def option_group(
    parameter: str, group: type, declared: dict[str, Any], names: list[str] | None = None, **defaults: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options ``declared`` for the fields ``names`` (all by default) of the
    dataclass ``group``; the command receives them as one ``group`` object, its parameter
    ``parameter``. ``defaults`` are the command's own."""
    hints = inspect.get_annotations(group, eval_str=True)
    own = {f.name: f for f in fields(group)}
    names = names or list(own)

    def default(name: str) -> Any:
        if name in defaults:
            return defaults[name]
        found = own[name]
        return found.default_factory() if found.default_factory is not MISSING else found.default

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default(name),
                annotation=Annotated[hints[name], declared[name]],
            )
            for name in names
        ]
        return _with_parameters(command, parameter, added, lambda values: group(**values))

    return decorate


def run_options(
    *groups: tuple[str, ...], **defaults: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the run options of ``groups`` (``LOADING``, ``TEXTS``, ``FITTING``,
    ``BATCHES``) from the one declaration in ``RUN_OPTIONS``; it receives them as
    ``run: RunOptions``. ``defaults`` are the command's own."""
    names = [name for group in groups for name in group]
    return option_group("run", RunOptions, RUN_OPTIONS, names, **defaults)


@dataclass(frozen=True)
class EvalOptions:
    """What `eval` compares (variants, recipes, weight pruning), on how many windows, what else it
    measures (tasks, generation) and where it writes."""

    weights: str = ""
    variant: list[str] = field(default_factory=list)
    variants: Path | None = None
    recipe: list[Path] = field(default_factory=list)
    windows: int = 32
    out: Path = Path("results/eval.json")
    markdown: Path | None = None
    tasks: str = ""
    limit: int | None = None
    task_dir: Path | None = None
    generate: int = 0
    prompt_tokens: int = 128
    new_tokens: int = 32
    layer_details: bool = False


EVAL_OPTIONS: dict[str, Any] = {
    "weights": typer.Option(
        help="Also prune weights at each N:M pattern: comma-separated magnitude, wanda, sparsegpt."
    ),
    "variant": typer.Option(
        help="Exact variant, e.g. 'pattern=8:16 criterion=amber quant=w8a8' (repeatable)."
    ),
    "variants": typer.Option(help="File with one variant per line."),
    "recipe": typer.Option(help="Recipe folder written by `actsparse calibrate` (repeatable)."),
    "windows": typer.Option(min=0, help="Number of windows to evaluate; 0 for the whole split."),
    "out": typer.Option(help="JSON file for every figure (written atomically)."),
    "markdown": typer.Option(help="Also write the table as Markdown here."),
    "tasks": typer.Option(
        help="Comma-separated lm-eval tasks: mmlu and lastword work offline, any other lm-eval name too."
    ),
    "limit": typer.Option(min=1, help="Examples per task (lm-eval --limit)."),
    "task_dir": typer.Option(help="Folder of lm-eval YAML task definitions, e.g. reading local files."),
    "generate": typer.Option(
        min=0, help="Prompts (cut from the evaluation text) for generation agreement; 0 skips it."
    ),
    "prompt_tokens": typer.Option(min=2, help="Tokens per generation prompt, BOS included."),
    "new_tokens": typer.Option(min=1, help="Greedy tokens generated per prompt."),
    "layer_details": typer.Option(
        help="Also save each layer's FLOP accounting and measured sensitivity in the JSON."
    ),
}
"""The options of `eval` alone, by ``EvalOptions`` field."""


@dataclass(frozen=True)
class SweepOptions:
    """A sweep's settings file, windows, results folder, and how its configurations run."""

    config_file: Path | None = None
    windows: int = 16
    out: Path = Path("results/sweep")
    ray: str | None = None
    configs_per_pass: int = 0


SWEEP_OPTIONS: dict[str, Any] = {
    "config_file": typer.Option(
        "--config",
        help="YAML file mapping setting names (pattern, criterion, corrections, policy, ...) to values or lists.",
    ),
    "windows": typer.Option(min=0, help="Evaluation windows per configuration; 0 for the whole split."),
    "out": typer.Option(help="Results directory (resumes a sweep left there)."),
    "ray": typer.Option(
        help="Run configurations as Ray tasks on this cluster address ('auto', 'ray://...', or 'local')."
    ),
    "configs_per_pass": typer.Option(
        min=0,
        help="Configurations evaluated together against one dense pass per window (0: all); "
        "lower it when their transformed weights do not fit in memory together.",
    ),
}
"""The options of `sweep` alone, by ``SweepOptions`` field."""


@dataclass(frozen=True)
class ConfigOptions:
    """The config settings a command was given on its command line, over the command's defaults."""

    given: dict[str, Any]
    defaults: dict[str, Any]
    command: str

    def configs(self) -> list[SparsityConfig]:
        """Every configuration of the cross product of the settings' comma-separated values."""
        return configs_from_settings({**self.defaults, **self.given})

    def one(self) -> SparsityConfig:
        """The one configuration a command describes; several values are refused."""
        configs = self.configs()
        if len(configs) != 1:
            raise ActsparseError(
                f"`actsparse {self.command}` describes one configuration; give one value per setting "
                f"(these settings give {len(configs)})."
            )
        return configs[0]


def config_options(**defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per ``SparsityConfig`` setting (its pieces' settings included),
    named as the setting, from the one definition in ``actsparse.config.config_settings``; the
    command receives them as ``config: ConfigOptions``. ``defaults`` are the command's own."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        added = []
        for setting in config_settings():
            default = defaults.get(setting.name, setting.default)
            shown = ", ".join(default) if isinstance(default, tuple) else default
            help = setting.help
            if setting.owners:
                help = f"{help.rstrip('.')} (setting of {' and '.join(setting.owners)})."
            names = [f"--{name.replace('_', '-')}" for name in (setting.name, *setting.old_names)]
            option = typer.Option(*names, help=f"{help} Default: {shown or 'none'}.")
            kind = list[str] | None if setting.repeatable else str | None
            added.append(
                inspect.Parameter(
                    setting.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[kind, option],
                )
            )
        name = command.__name__.removesuffix("_command")

        def build(values: dict[str, Any]) -> ConfigOptions:
            return ConfigOptions({k: v for k, v in values.items() if v is not None}, defaults, name)

        return _with_parameters(command, "config", added, build)

    return decorate


def check_file_outputs(*paths: Path | None) -> None:
    """Refuse, before any work, an output file path where a folder is, in a folder that cannot be
    written, or given for two outputs."""
    given = [path for path in paths if path is not None]
    for path in given:
        check_file_target(path)
        check_writable(path)
    for index, path in enumerate(given):
        if any(path.resolve() == other.resolve() for other in given[:index]):
            raise ActsparseError(
                f"{path} is given for two outputs (--out and --markdown), so one would overwrite the "
                "other; give each its own path."
            )
