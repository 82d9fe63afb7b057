"""Name -> implementation registries, used everywhere instead of if/elif chains."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    """One registered implementation and what users need to know about it."""

    name: str
    fn: Callable[..., Any]
    summary: str = ""
    paper: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """Keyword-only arguments with defaults: the entry's config and its default values."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}

    def takes_any_keyword(self) -> bool:
        params = inspect.signature(self.fn).parameters.values()
        return any(p.kind is p.VAR_KEYWORD for p in params)


class Registry:
    """A named collection of implementations of one kind (losses, record kinds, file formats...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, summary: str = "", paper: str = "", **meta: Any):
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, summary, paper, meta)
            return fn

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def call(self, name: str, /, *args: Any, **config: Any) -> Any:
        """Call an entry, rejecting config keys it does not take with a clear message."""
        entry = self.get(name)
        unknown = set(config) - set(entry.defaults())
        if unknown and not entry.takes_any_keyword():
            raise TypeError(
                f"{self.kind} {name!r} takes no option(s) {sorted(unknown)}; "
                f"its options are {sorted(entry.defaults())}"
            )
        return entry.fn(*args, **config)
