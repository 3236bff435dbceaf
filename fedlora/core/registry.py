"""The registry type: a named collection of choices (strategies, personalizations, data sources)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from fedlora.core.errors import ConfigError, RegistryError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries under unique names, looked up by the run-config key that chooses them.

    Parameters
    ----------
    key : str
        The run-config key whose values are this registry's names (``strategy``,
        ``personalization``, ``dataset``): lookup errors name it.

    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``.

        Raises
        ------
        RegistryError
            If ``name`` is already registered (two modules claiming one name).

        """
        if name in self._entries:
            raise RegistryError(f"{self.key}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises
        ------
        ConfigError
            If no entry has that name; the message lists the accepted names.

        """
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{self.key}: must be one of {', '.join(self.names())}, got {name!r}") from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return sorted(self._entries.items())

    def values(self) -> list[T]:
        """Every entry, sorted by name."""
        return [entry for _, entry in self.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
