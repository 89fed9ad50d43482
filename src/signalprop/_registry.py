"""A tiny name -> (factory, default hyper-parameters) registry shared by every sub-package.

Unknown names fail loudly with a ``ValueError`` that names the bad value and lists the valid ones,
so a typo in a config or on the command line never silently falls back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered item: the callable and its default keyword arguments."""

    name: str
    fn: T
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


class Registry(Generic[T]):
    """Maps names to ``(fn, default_hparams)``.

    Args:
        kind: What the registry holds, used in error messages (e.g. ``"activation"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, fn: T | None = None, *, doc: str = "", **defaults: Any
    ) -> Any:
        """Register ``fn`` under ``name``; usable as a decorator when ``fn`` is omitted."""
        key = name.lower()

        def _add(f: T) -> T:
            if key in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[key] = Entry(key, f, dict(defaults), doc)
            return f

        if fn is None:
            return _add
        return _add(fn)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise ``ValueError`` listing the valid names."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise ValueError(unknown_name_message(self.kind, name, self.names())) from None

    def get(self, name: str) -> T:
        """The registered callable for ``name``."""
        return self.entry(name).fn

    def defaults(self, name: str) -> dict[str, Any]:
        """A copy of the default hyper-parameters for ``name``."""
        return dict(self.entry(name).defaults)

    def build(self, name: str, **overrides: Any) -> Any:
        """Call the registered factory with its defaults updated by ``overrides``.

        Unknown override keys raise ``ValueError`` naming them (when defaults are declared).
        """
        e = self.entry(name)
        kwargs = dict(e.defaults)
        kwargs.update(overrides)
        return e.fn(**kwargs)  # type: ignore[operator]


def unknown_name_message(kind: str, name: object, valid: list[str]) -> str:
    """``unknown activation 'sigmiod'; did you mean 'sigmoid'? valid: ...``"""
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), valid, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return f"unknown {kind} {name!r}{hint} valid choices: {', '.join(valid)}"


def check_choice(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    """Validate a string option against a fixed list of choices."""
    if value not in valid:
        raise ValueError(unknown_name_message(kind, value, list(valid)))
    return value


Factory = Callable[..., Any]
