"""Where actsparse keeps its cache, and how it writes files so nothing is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$ACTSPARSE_CACHE``, else ``$XDG_CACHE_HOME/actsparse``, else ``~/.cache/actsparse``."""
    if explicit := os.environ.get("ACTSPARSE_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actsparse"


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh scratch directory beside ``target``; it becomes ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield scratch
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
