"""Name -> implementation tables filled by decorators (losses, rewards)."""

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = item
            return item

        return wrap

    def lookup(self, name: str) -> T:
        """The entry for `name`; ValueError listing the known names otherwise."""
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None
