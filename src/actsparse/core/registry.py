"""Registries of named pieces: criteria, corrections, layer policies and backends.

Each concept a user names is one registered piece in one module (``criteria``, ``corrections``,
``policy``, ``backends``); adding one is a class (or object) and ``@REGISTRY.register``, nothing
else. A piece's settings are the fields of its frozen dataclass, and their names are the names of
the command-line options and of the ``key=value`` words of variants and sweep files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from actsparse.core.errors import ActsparseError, shorten

T = TypeVar("T")


class Registry(Generic[T]):
    """Named pieces of one kind (``kind`` names it in messages, e.g. "criterion")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._pieces: dict[str, T] = {}

    def register(self, piece: T) -> T:
        """Add ``piece`` under its ``name`` (usable as a decorator); a second piece of the same
        name replaces the first, so a test or plugin can override one."""
        self._pieces[piece.name] = piece  # type: ignore[attr-defined]
        return piece

    def unregister(self, name: str) -> None:
        """Take the piece ``name`` out again (for tests and plugins)."""
        self._pieces.pop(name, None)

    def get(self, name: str) -> T:
        """The piece called ``name``; an unknown name is refused with the list of known ones."""
        try:
            return self._pieces[name]
        except (KeyError, TypeError):  # TypeError: not even a name (a list, say)
            raise ActsparseError(
                f"Unknown {self.kind} {shorten(repr(name))}; choose one of {', '.join(self)}."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._pieces

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def values(self) -> list[T]:
        return list(self._pieces.values())


class Piece:
    """Base of the configurable pieces (corrections, policies): a frozen dataclass whose fields are
    its settings. ``name`` and ``description`` are class attributes."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    absent_means: ClassVar[dict[str, Any]] = {}
    """What a stored piece that lacks a setting did: for settings added after such pieces were saved
    whose default is not what those pieces did (``piece_from_dict`` reads them so)."""

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        """The piece's own settings (its dataclass fields)."""
        return list(dataclasses.fields(cls))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <setting>: <value>, ...}``; ``piece_from_dict`` reads it back."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    def changed_settings(self) -> dict[str, Any]:
        """The settings that differ from the piece's defaults (shown in labels)."""
        return {
            f.name: getattr(self, f.name)
            for f in self.settings()
            if f.default is not dataclasses.MISSING and getattr(self, f.name) != f.default
        }


P = TypeVar("P", bound=Piece)


def piece_from_dict(registry: Registry[type[P]], data: dict[str, Any]) -> P:
    """Rebuild a piece from ``Piece.to_dict``."""
    data = dict(data)
    return stored_piece(registry.get(data.pop("name")), data)


def stored_piece(cls: type[P], settings: dict[str, Any]) -> P:
    """A piece from stored ``settings``: those it lacks take ``cls.absent_means``, then the defaults."""
    return build_piece(cls, {**cls.absent_means, **settings})


def own_settings(cls: type[Piece], settings: dict[str, Any]) -> dict[str, Any]:
    """The part of ``settings`` that names settings of ``cls`` (the rest belongs to other pieces)."""
    names = {f.name for f in cls.settings()}
    return {key: value for key, value in settings.items() if key in names}


def build_piece(cls: type[P], settings: dict[str, Any]) -> P:
    """``cls(**settings)``; a setting the piece does not have is refused with one sentence."""
    known = {f.name for f in cls.settings()}
    if unknown := set(settings) - known:
        raise ActsparseError(
            f"{cls.name} takes no setting {', '.join(sorted(unknown))}; "
            f"its settings are {', '.join(sorted(known)) or 'none'}."
        )
    return cls(**settings)


def setting(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A piece's setting: its default, one line of help, and how to read it from text."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse or type(default)})
