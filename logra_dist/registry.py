"""Kinds as small classes that register themselves by subclassing (curvature, layer type, codec).

    CODECS: Registry[RowCodec] = Registry("storage codec")

    class RowCodec:
        name: ClassVar[str]
        def __init_subclass__(cls, **kw):
            super().__init_subclass__(**kw)
            CODECS.register(cls)

    class Int8Codec(RowCodec):
        name = "int8"          # now CODECS.get("int8") is Int8Codec

Adding a kind is one new class in one file; nothing dispatches on the name elsewhere. The names a
config may use are validated once at the edge (`config.py` lists them; each registry's test checks
that the two agree).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from logra_dist.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> class, filled as the classes are defined."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Register `cls` under `cls.name`; a class without its own `name` is abstract and skipped."""
        name = cls.__dict__.get("name")
        if name is None:
            return cls
        other = self._classes.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"{self.kind} {name!r} is already registered by {other.__module__}.{other.__qualname__}")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def names(self) -> list[str]:
        return list(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
