"""Small helpers with no metann imports."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

__all__ = ["SubDict"]


class SubDict(MutableMapping):
    """A mutable view on some keys of another mapping.

    Reading, writing and deleting go through to ``super_dict``; only the chosen keys
    are visible. Writing a new key adds it to both the view and ``super_dict``.

    Args:
        super_dict: The mapping to view.
        keys: The visible keys; each must be in ``super_dict``.
        keep_order: Iterate in ``super_dict``'s order (``True``) or in the order of ``keys``.

    Raises:
        KeyError: If a key is not in ``super_dict``.

    Example:
        >>> sup = {"a": 1, "b": 2, "c": 3}
        >>> sub = SubDict(sup, keys=["c", "a"])
        >>> dict(sub)
        {'a': 1, 'c': 3}
        >>> sub["a"] = 10
        >>> sup["a"]
        10
    """

    def __init__(self, super_dict: MutableMapping, keys: Iterable[Any] = (), keep_order: bool = True) -> None:
        self.super_dict = super_dict
        self.keep_order = keep_order
        keys = list(keys)
        missing = [k for k in keys if k not in super_dict]
        if missing:
            raise KeyError(f"`SubDict` keys {sorted(map(str, missing))} are not in the super dict.")
        self._keys = dict.fromkeys(keys)

    def update_keys(self) -> None:
        """Drop the keys that the super dict no longer has."""
        self._keys = {k: None for k in self._keys if k in self.super_dict}

    def __getitem__(self, key: Any) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self.super_dict[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.super_dict[key] = value
        if key not in self._keys:
            self._keys[key] = None

    def __delitem__(self, key: Any) -> None:
        if key not in self._keys or key not in self.super_dict:  # check both before changing either
            raise KeyError(key)
        del self.super_dict[key]
        del self._keys[key]

    def __iter__(self) -> Iterator[Any]:
        if self.keep_order:  # the super dict's current order: a key deleted and re-inserted moves last
            return iter([k for k in self.super_dict if k in self._keys])
        return iter([k for k in self._keys if k in self.super_dict])

    def __len__(self) -> int:
        return sum(1 for k in self._keys if k in self.super_dict)

    def __repr__(self) -> str:
        return f"SubDict({dict(self)!r})"
