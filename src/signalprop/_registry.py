"""A tiny name -> (factory, default hyper-parameters) registry shared by every sub-package.

Unknown names fail loudly with a ``ValueError`` that names the bad value and lists the valid ones,
so a typo in a config or on the command line never silently falls back to a default. Aliases
(``"he"`` for ``"kaiming"``) resolve to their canonical name here, in :meth:`Registry.entry`, and
nowhere else; :meth:`Registry.derive` makes a registry of one face of each entry (the tables of
:mod:`signalprop.vocab` seen by one layer of the package) sharing those aliases.
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
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str, fn: T | None = None, *, doc: str = "", **defaults: Any
    ) -> Any:
        """Register ``fn`` under ``name``; usable as a decorator when ``fn`` is omitted."""
        key = name.lower()

        def _add(f: T) -> T:
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[key] = Entry(key, f, dict(defaults), doc)
            return f

        if fn is None:
            return _add
        return _add(fn)

    def alias(self, alias: str, canonical: str) -> None:
        """Let ``alias`` stand for the registered ``canonical`` name (old configs keep working)."""
        a, c = alias.lower(), canonical.lower()
        if c not in self._entries:
            raise ValueError(unknown_name_message(self.kind, canonical, self.names()))
        if a in self._entries or a in self._aliases:
            raise ValueError(f"{self.kind} {alias!r} is already registered")
        self._aliases[a] = c

    def aliases(self) -> dict[str, str]:
        """``alias -> canonical name``."""
        return dict(sorted(self._aliases.items()))

    def canonical(self, name: str) -> str:
        """The canonical spelling of ``name`` (an alias resolved, case folded)."""
        return self.entry(name).name

    def names(self) -> list[str]:
        """Registered canonical names, sorted (aliases are not listed)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.lower()
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """Return the entry for ``name`` or raise ``ValueError`` listing the valid names."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}")
        key = name.lower()
        try:
            return self._entries[self._aliases.get(key, key)]
        except KeyError:
            raise ValueError(
                unknown_name_message(self.kind, name, self.names(), list(self._aliases))
            ) from None

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

    def derive(
        self,
        face: Callable[[Entry[T]], Any],
        kind: str | None = None,
        defaults: Callable[[Entry[T]], dict[str, Any]] | None = None,
    ) -> Registry[Any]:
        """A registry holding ``face(entry)`` for each entry where it is not ``None``.

        The derived entries keep their names, docs and defaults (or ``defaults(entry)``: the
        defaults as that face spells them), and the aliases of the names they keep: the derived
        table is a view of this one, not a second list of names.
        """
        out: Registry[Any] = Registry(kind or self.kind)
        for e in self._entries.values():
            f = face(e)
            if f is not None:
                d = dict(e.defaults) if defaults is None else defaults(e)
                out._entries[e.name] = Entry(e.name, f, d, e.doc)
        out._aliases = {a: c for a, c in self._aliases.items() if c in out._entries}
        return out


def unknown_name_message(
    kind: str, name: object, valid: list[str], aliases: list[str] | None = None
) -> str:
    """``unknown activation 'sigmiod'; did you mean 'sigmoid'? valid: ...``"""
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), [*valid, *(aliases or [])], n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return f"unknown {kind} {name!r}{hint} valid choices: {', '.join(valid)}"


def check_choice(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    """Validate a string option against a fixed list of choices."""
    if value not in valid:
        raise ValueError(unknown_name_message(kind, value, list(valid)))
    return value


Factory = Callable[..., Any]
