"""A small plugin registry, modelled on lm-evaluation-harness's ``Registry``.

Entries are either objects or lazy ``"module:attr"`` strings that are imported on first use, so
listing what exists never imports heavy code. Unknown names fail with a did-you-mean message.
``list(pattern)`` accepts shell wildcards as timm's ``list_models`` does.

Plugins: a registry with an ``entry_point_group`` (``blockbench.metrics``, ``blockbench.selectors``)
also holds every entry point of that group from the installed distributions, read on first use and
imported only when asked for, with the distribution as its origin. A plugin that fails to import, or
whose object fails the registry's ``check``, raises :class:`RegistryError` naming it and its
distribution when it is asked for; it never breaks listing or other entries (:meth:`Registry.error`
says what is wrong with it). A name claimed twice (two distributions, or a plugin and a built-in) is
an error that names both; a built-in keeps its name.

It lives in ``estimators`` because that is the bottom layer: ``algorithms`` and ``bench`` build
their own registries from this class without importing upwards.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: object, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.5) -> str:
    """``" Did you mean 'x'?"`` (or ``'x' or 'y'``) for up to ``n`` of ``choices`` close to ``name``
    (:func:`difflib.get_close_matches` at ``cutoff``), best first; ``""`` when none is close.

    Meant to end an error message: ``f"unknown metric {name!r}.{did_you_mean(name, names)}"``.
    """
    close = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class RegistryError(KeyError):
    """An unknown or duplicate name in a registry. ``str()`` is the human message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Registry(Generic[T]):
    """Maps names to objects, resolving lazy ``module:attr`` entries on first access."""

    def __init__(self, kind: str, *, entry_point_group: str | None = None, base: type | str | None = None,
                 check: Callable[[Any], str | None] | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        #: every class registered must subclass it (checked when a lazy entry loads); a ``module:attr``
        #: string is imported only then, so a registry stays cheap to import and to list
        self.base = base
        self._check = check  #: returns why an object is unfit, or None (after the ``base`` check)
        self._entries: dict[str, T | str] = {}
        self._origins: dict[str, str] = {}
        self._errors: dict[str, str] = {}  #: broken entries: name -> why
        self._plugins_read = entry_point_group is None

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        self._plugins_read = True
        from importlib.metadata import entry_points

        seen: set[tuple[str, str, str]] = set()
        for ep in entry_points(group=self.entry_point_group):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
            if (ep.name, ep.value, dist) in seen:  # one distribution seen twice on sys.path
                continue
            seen.add((ep.name, ep.value, dist))
            origin = f"plugin: {dist}"
            if ep.name in self._entries:
                first = self._origins[ep.name]
                message = f"{self.kind} {ep.name!r} is registered twice: by {first} and by {origin}"
                if first == "built-in":  # the built-in keeps its name; the plugin is reported
                    self._errors.setdefault(f"{ep.name} ({dist})", message)
                    continue
                self._errors[ep.name] = message
                self._origins[ep.name] = f"{first}; {origin}"
                continue
            self._entries[ep.name] = ep.value
            self._origins[ep.name] = origin

    def error(self, name: str) -> str | None:
        """Why the entry ``name`` cannot be used (None when it can); imports it to find out."""
        try:
            self.get(name)
        except RegistryError as exc:
            return exc.message
        return None

    def errors(self) -> dict[str, str]:
        """Every broken entry with its reason (plugins that failed to load, clashing names)."""
        self._read_plugins()
        for name in list(self._entries):
            self.error(name)
        return dict(sorted(self._errors.items()))

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
        self._read_plugins()
        if name in self._errors:
            raise RegistryError(self._errors[name])
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            try:
                obj = _import(entry)
                why = self.problem(obj)
            except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal elsewhere
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                self._errors[name] = (f"{self.kind} {name!r} from {self._origins[name]} ({entry}) cannot be "
                                      f"used: {why}")
                raise RegistryError(self._errors[name])
            self._entries[name] = obj
            return obj
        return entry

    def problem(self, obj: Any) -> str | None:
        """Why ``obj`` cannot be an entry of this registry (not a subclass of ``base``, or what ``check``
        says), or None."""
        base = _import(self.base) if isinstance(self.base, str) else self.base
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            return f"{obj!r} is not a subclass of {base.__module__}.{base.__qualname__}"
        return self._check(obj) if self._check is not None else None

    def unknown_message(self, name: str) -> str:
        """The error message for an unknown ``name``: the close known names, then every known name."""
        known = ", ".join(sorted(self._entries))
        return f"unknown {self.kind} {name!r}.{did_you_mean(name, self._entries)} Known: {known}"

    def origin(self, name: str) -> str:
        self._read_plugins()
        return self._origins[name]

    def list(self, pattern: str = "*") -> list[str]:
        """Names matching the wildcard ``pattern`` (broken plugins included: :meth:`error` says why)."""
        self._read_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._read_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        self._read_plugins()
        return len(self._entries)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Registry({self.kind!r}, {self.list()})"


def find(name: str, *registries: Registry[Any]) -> Registry[Any]:
    """The one of ``registries`` that holds ``name``: one axis served by several registries (a grid's
    metrics: those of hidden states and those of models). Unknown names get a did-you-mean over all of
    them; a name held by two is an error naming both origins."""
    holders = [r for r in registries if name in r]
    if len(holders) > 1:
        origins = " and by ".join(r.origin(name) for r in holders)
        raise RegistryError(f"{holders[0].kind} {name!r} is registered twice: by {origins}")
    if not holders:
        names = sorted({n for r in registries for n in r.list()})
        raise RegistryError(f"unknown {registries[0].kind} {name!r}.{did_you_mean(name, names)} "
                            f"Known: {', '.join(names)}")
    return holders[0]


def _import(target: str) -> Any:
    """The object a ``module:attr.sub`` string names."""
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_params(cls: Callable[..., Any], params: dict[str, Any]) -> dict[str, Any]:
    """``params`` bound to ``cls``'s constructor signature with every default filled in: a component's
    parameters as it will really run, its identity. ``TypeError`` for a parameter it does not take.
    Keyword catch-alls (``**kwargs``) contribute what was given."""
    sig = inspect.signature(cls)
    bound = sig.bind(**params)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return dict(sorted(out.items()))


def describe(obj: Any) -> str:
    """The first paragraph of an object's docstring on one line, for ``bench list`` (a first line that
    breaks mid-sentence is not cut there)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) if doc else ""
