"""Where actsparse keeps its cache, and how it writes files so nothing is ever half-written, lost
or shared by two runs.

- ``write_text_atomic`` / ``write_json_atomic``: a temporary file beside the target, then an atomic
  rename; the file gets the permissions the umask gives a new file (not ``mkstemp``'s 0600).
- ``atomic_directory``: a scratch folder beside the target that becomes the target only on success;
  an existing target is replaced only when ``replaceable`` says it may be.
- ``output_lock``: one run at a time per output path (``<out>.lock``, with the owner's process id;
  a lock whose process is gone is taken over, and the scratch files a killed run left are removed).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

from actsparse.core.errors import ActsparseError, shorten


def cache_dir() -> Path:
    """``$ACTSPARSE_CACHE``, else ``$XDG_CACHE_HOME/actsparse``, else ``~/.cache/actsparse``."""
    if explicit := os.environ.get("ACTSPARSE_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "actsparse"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: Path | str) -> None:
    """Give ``path`` the permissions the umask gives a new file or folder (temporary files and
    some writers, safetensors' included, create them readable by their owner alone)."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())


def scratch_prefix(target: Path) -> str:
    """The name prefix of the temporary files and folders written beside ``target``."""
    return f".{target.name}."


@contextmanager
def atomic_directory(target: Path, replaceable: Callable[[Path], bool] = lambda path: True) -> Iterator[Path]:
    """Yield a fresh scratch directory beside ``target``; it becomes ``target`` only on success.

    An existing ``target`` is replaced only when ``replaceable(target)`` is true; otherwise (or
    when it is a file) the write is refused before anything changes.
    """
    check_replaceable(target, replaceable)
    scratch = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix(target), dir=target.parent))
        honour_umask(scratch)
        yield scratch
        check_replaceable(target, replaceable)
        if target.exists():
            shutil.rmtree(target)
        scratch.rename(target)
    except (OSError, SafetensorError) as error:  # a full disk or a read-only place, at any step
        raise write_error(target, error) from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def write_error(target: Path, error: BaseException) -> ActsparseError:
    """The sentence for a write to ``target`` that failed with ``error`` (an ``OSError``, or
    safetensors' error wrapping one), naming what to do; inside the cache it names
    ``ACTSPARSE_CACHE``."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return ActsparseError(f"Could not write {target} ({shorten(reason)}); {_fix(target)}.")


def check_replaceable(target: Path, replaceable: Callable[[Path], bool] = lambda path: True) -> None:
    """Refuse ``target`` as a folder to write when something that may not be replaced is there."""
    if target.is_file() or target.is_symlink():
        raise ActsparseError(
            f"{target} is a file, not a folder; choose another path for the folder to write."
        )
    if target.is_dir() and any(target.iterdir()) and not replaceable(target):
        raise ActsparseError(
            f"{target} is a folder that actsparse did not write; choose a new or empty folder, "
            "so that nothing of yours is replaced."
        )


def check_file_target(path: Path) -> None:
    """Refuse a path to write a file to where a folder is."""
    if path.is_dir():
        raise ActsparseError(f"{path} is a folder; give the path of a file to write.")


def check_writable(path: Path) -> None:
    """Refuse, before any work, a path whose folder cannot be written (read-only, not a folder, or
    not permitted): the nearest folder that exists on the way to ``path`` must be writable."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ActsparseError(
            f"{folder} is a file, so nothing can be written under it; choose another path than {path}."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ActsparseError(
            f"{folder} cannot be written (read-only or not permitted), so {path} cannot be saved; "
            f"{_fix(path)}."
        )


def _fix(target: Path) -> str:
    """What to do when ``target`` cannot be written: inside the cache, move the cache."""
    if target.absolute().is_relative_to(cache_dir().absolute()):
        return "set ACTSPARSE_CACHE to a folder with room that you can write to"
    return "free space there or choose a path you can write to"


@contextmanager
def atomic_file(path: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """A file to write (``mode`` ``"w"``, UTF-8 text, or ``"wb"``) at a temporary name beside
    ``path``, renamed onto ``path`` when the block ends; a failure (a full disk) leaves neither
    half a file nor the temporary one."""
    path = Path(path)
    check_file_target(path)
    scratch = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, scratch = tempfile.mkstemp(dir=path.parent, prefix=scratch_prefix(path))
        with os.fdopen(descriptor, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as file:
            yield file
        honour_umask(scratch)
        os.replace(scratch, path)
    except OSError as error:
        raise write_error(path, error) from None
    finally:
        if scratch is not None and Path(scratch).exists():
            Path(scratch).unlink()


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_file(path) as file:
        file.write(text)


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` for the duration of a run that writes ``target``; a second run on the
    same output is refused with one sentence while the first is alive."""
    lock = target.with_name(target.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ActsparseError(
            f"Could not create {lock.parent} ({error.strerror}); choose another output path."
        ) from None
    for attempt in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if attempt or (owner and owner != os.getpid() and _alive(owner)):
                raise ActsparseError(
                    f"Another actsparse run (process {owner or 'unknown'}) is writing {target}; wait for it "
                    f"to finish or choose another output path (delete {lock} if no run is left)."
                ) from None
            lock.unlink(missing_ok=True)  # its process is gone: a run that was killed
            continue
        except OSError as error:
            raise ActsparseError(
                f"Could not create {lock} ({error.strerror}); choose another output path."
            ) from None
        with os.fdopen(descriptor, "w") as file:
            file.write(str(os.getpid()))
        break
    try:
        # Holding the lock, no other run writes beside target: scratch files left there are a killed run's.
        for stale in target.parent.glob(f"{glob.escape(scratch_prefix(target))}*"):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)
