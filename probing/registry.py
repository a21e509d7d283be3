"""One small registry class shared by every family (backbones, heads, losses, methods, metrics).

A name in a sweep spec maps to exactly one registered builder; an unknown name fails with the
list of known names and the closest match, so a typo in YAML is fixed in one step.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "unknown_name"]


def unknown_name(family: str, name: object, known) -> str:
    """``unknown <family> <name>: known are ...; did you mean ...?``: the one message for a name that
    is not among ``known`` (registries, layers, splits, options)."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {family} {name!r}: known are {', '.join(known)}{hint}"


class Registry(Generic[T]):
    """Maps names to builders for one family of components.

    Args:
        family (str): What the registry holds, used in error messages ("backbone", "loss").
    """

    def __init__(self, family: str):
        self.family = family
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that records ``obj`` under ``name``; registering a name twice is a bug."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The builder registered as ``name``.

        Raises:
            ValueError: ``name`` is unknown; the message lists the known names and the closest one.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown ``name``, shared with the spec validator."""
        return unknown_name(self.family, name, sorted(self._entries))

    def description(self, name: str) -> str:
        """One line on the entry ``name``: its ``description``, or its docstring's first line."""
        entry = self.get(name)
        text = getattr(entry, "description", None) or inspect.getdoc(entry) or ""
        return text.strip().split("\n")[0].replace("``", "")

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
