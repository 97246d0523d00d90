"""Name -> class registries filled by class decorators (networks, predictors, correctors).

The score-SDE code looks up the network, predictor and corrector of a config by name; each kind
keeps one `Registry`, so registering and the error for an unknown name are written once.
"""
from __future__ import annotations

from collections.abc import Callable


class Registry:
    """Classes of one kind by name; `register` is the decorator, `get` the checked lookup.

    `unknown` is the message for a name that is not registered, formatted with `name` and
    `known` (the registered names, sorted and comma-separated).
    """

    def __init__(self, kind: str, unknown: str | None = None):
        self.kind = kind
        self.unknown = unknown or f"Unknown {kind} '{{name}}': choose one of {{known}}."
        self._classes: dict[str, type] = {}

    def register(self, cls: type | None = None, *, name: str | None = None) -> type | Callable:
        """Register `cls` under `name` (default: the class name); usable as `@register` and
        `@register(name=...)`. Registering another class under a taken name raises ValueError."""

        def _register(cls: type) -> type:
            local_name = cls.__name__ if name is None else name
            if local_name in self._classes and self._classes[local_name] is not cls:
                raise ValueError(f"A {self.kind} named '{local_name}' is already registered.")
            self._classes[local_name] = cls
            return cls

        return _register if cls is None else _register(cls)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as `name`; ValueError naming the known ones otherwise."""
        if name not in self._classes:
            raise ValueError(self.unknown.format(name=name, known=", ".join(self.names())))
        return self._classes[name]
