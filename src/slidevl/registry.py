"""Named registries: one ``register`` decorator and one ``list`` per kind of component.

Encoders, survival models and connectors are each chosen by name. A registry maps the
name to the class (or builder) that makes it, so adding one is a decorator on the new
class and nothing else; ``docs/adding-a-model.md`` walks through it::

    SURVIVAL_MODELS = Registry("survival model")

    @SURVIVAL_MODELS.register("abmil")
    class ABMIL(SurvivalModel): ...

    SURVIVAL_MODELS.get("abmil")      # -> ABMIL
    SURVIVAL_MODELS.names()           # -> ["abmil", ...]
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from slidevl.errors import NotFoundError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → entries of one kind, filled by :meth:`register` at import time."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator recording the decorated class (or function) under ``name``."""
        if not name or name != name.strip().lower():
            raise ValueError(f"{self.kind} names are lower-case and non-empty, got {name!r}")

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._entries[name]!r} and {entry!r})")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name is an error that lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise NotFoundError(f"unknown {self.kind} {name!r}; use one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """Every registered name, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
