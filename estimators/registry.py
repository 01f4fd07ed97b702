"""A small plugin registry, modelled on lm-evaluation-harness's ``Registry``.

Entries are either objects or lazy ``"module:attr"`` strings that are imported on first use, so
listing what exists never imports heavy code. Unknown names fail with a did-you-mean message.
``list(pattern)`` accepts shell wildcards as timm's ``list_models`` does.

It lives in ``estimators`` because that is the bottom layer: ``algorithms`` and ``bench`` build
their own registries from this class without importing upwards.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry. ``str()`` is the human message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """Maps names to objects, resolving lazy ``module:attr`` entries on first access."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, target: T | str | None = None, *, origin: str = "built-in"):
        """Register ``target`` under ``name``; usable as a decorator when ``target`` is omitted."""

        def _add(obj: T | str) -> T | str:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is registered twice: by {self._origins[name]} and by {origin}"
                )
            self._entries[name] = obj
            self._origins[name] = origin
            return obj

        if target is None:
            return _add
        return _add(target)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            obj = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = obj
            return obj
        return entry

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}"

    def origin(self, name: str) -> str:
        return self._origins[name]

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Registry({self.kind!r}, {self.list()})"


def describe(obj: Any) -> str:
    """First line of an object's docstring, for ``bench list``."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
