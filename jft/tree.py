"""Nested dicts of parameters: walk them by path, read, test and set a path.

A path is a tuple of keys; anything that is not a Mapping is a leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping) -> dict:
    """Nested dict of ``fn("a/b/c", leaf)`` for every leaf of the nested dict ``tree``."""
    return map_paths(lambda path, leaf: fn("/".join(path), leaf), tree)


def map_paths(fn: Callable[[tuple[str, ...], Any], Any], tree: Any, prefix: tuple[str, ...] = ()) -> Any:
    if isinstance(tree, Mapping):
        return {k: map_paths(fn, v, prefix + (str(k),)) for k, v in tree.items()}
    return fn(prefix, tree)


def walk(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` for every leaf of a nested dict (anything not a Mapping is a leaf)."""
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from walk(v, prefix + (str(k),))
    else:
        yield prefix, tree


def flat(tree: Mapping, sep: str = "/") -> dict:
    """``{"a/b/c": leaf}`` for every leaf of a nested dict (keys joined by ``sep``)."""
    return {sep.join(path): leaf for path, leaf in walk(tree)}


def get_path(tree, path):
    """The value at ``path`` (a tuple of keys) of a nested dict."""
    for k in path:
        tree = tree[k]
    return tree


def has_path(tree, path) -> bool:
    """Whether a nested dict has a value at ``path``."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return False
        tree = tree[k]
    return True


def set_path(tree, path, value) -> None:
    """Set ``tree[path[0]]...[path[-1]] = value``, creating dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
