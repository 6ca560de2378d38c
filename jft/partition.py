"""Which parameters train: ordered regex rules over parameter paths -> labels -> two subtrees.

A path joins the nested dict keys with ``/``: ``model/embed_tokens/embedding``,
``lm_head/kernel``. Leaves under ``model/layers`` are stacked ``[num_layers, ...]`` (the
layer scan), so rules see them once per layer through the virtual path
``model/layers/{i}/mlp/up_proj/kernel``; that lets a rule train or freeze single layers.

    rules = last_layers(2, num_layers=16)        # or FULL, or your own ((regex, label), ...)
    labels = partition.labels(params, rules, num_layers=16)
    trainable, frozen = partition.split(params, labels)
    masks = partition.layer_masks(trainable, labels)    # for partially trainable stacks

Labels per leaf: ``True`` (trainable), ``False`` (frozen), a bool numpy vector ``[num_layers]``
for a stacked leaf whose layers differ, or a bool array with the leaf's number of dimensions
that broadcasts against it, e.g. ``[vocab, 1]`` for some rows of ``model/embed_tokens/embedding``
(``jft.vocab.new_row_labels``; :func:`labels` itself gives the first three). A partly trainable
leaf lives whole in ``trainable``; its frozen parts are held still by the masks (zeroed gradients
and updates).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.tree import get_path, has_path, map_paths, set_path, walk

Rules = Sequence[tuple[str, str]]

FULL: tuple[tuple[str, str], ...] = ((".*", "trainable"),)
STACKED_PREFIX = ("model", "layers")  # leaves under here carry a leading [num_layers] axis
LABELS = ("trainable", "frozen")


# ---------------------------------------------------------------------------- rule sets


def last_layers(n: int, num_layers: int) -> tuple[tuple[str, str], ...]:
    """Train the last ``n`` decoder layers, the final norm and ``lm_head``; freeze the rest.

    With tied embeddings there is no ``lm_head`` leaf: the output projection is the
    (frozen) embedding table.
    """
    if not 0 <= n <= num_layers:
        raise ValueError(f"last_layers: n={n} must be between 0 and num_layers={num_layers}")
    rules = []
    if n:
        layers = "|".join(str(i) for i in range(num_layers - n, num_layers))
        rules.append((f"model/layers/({layers})/.*", "trainable"))
    rules += [("model/norm/.*", "trainable"), ("lm_head/.*", "trainable"), (".*", "frozen")]
    return tuple(rules)


# ---------------------------------------------------------------------------- labels


def labels(params: Mapping, rules: Rules, num_layers: int | None = None) -> dict:
    """Label every leaf of ``params`` by the first rule whose regex ``re.fullmatch``-es its path.

    Args:
      params: nested dict of arrays (or ``jax.ShapeDtypeStruct``s).
      rules: ``(regex, "trainable" | "frozen")`` pairs, in order.
      num_layers: length of the stacked layer axis; None reads it from the first stacked leaf.

    Returns a tree shaped like ``params`` with ``True``, ``False`` or a bool ``[num_layers]``
    vector per leaf. Raises ValueError when a rule is malformed, when no rule matches a
    path (naming the path and the rules), or when a stacked leaf has the wrong leading axis.
    """
    compiled = _compile(rules)

    def match(path: str, shown: str) -> bool:
        for regex, trainable in compiled:
            if regex.fullmatch(path):
                return trainable
        raise ValueError(
            f"no partition rule matches parameter {shown}; rules (first match wins, re.fullmatch): "
            f"{[tuple(r) for r in rules]}. Add a rule for it, or end the rules with ('.*', 'frozen')."
        )

    def label(path: tuple[str, ...], leaf) -> bool | np.ndarray:
        name = "/".join(path)
        if not _is_stacked(path):
            return match(name, repr(name))
        shape = _shape(leaf)
        if not shape or shape[0] != num_layers:
            raise ValueError(f"stacked parameter {name!r} has shape {shape}; expected a leading axis of {num_layers}")
        rest = "/".join(path[len(STACKED_PREFIX) :])
        per_layer = np.array(
            [
                match(f"model/layers/{i}/{rest}", f"'model/layers/{i}/{rest}' (layer {i} of {name!r})")
                for i in range(num_layers)
            ],
            bool,
        )
        return bool(per_layer[0]) if per_layer.all() or not per_layer.any() else per_layer

    if num_layers is None:
        num_layers = next((_shape(x)[0] for p, x in walk(params) if _is_stacked(p) and _shape(x)), 0)
    return map_paths(label, params)


def split(params: Mapping, labels: Mapping) -> tuple[dict, dict]:
    """``(trainable, frozen)``: two nested dicts that hold each leaf once (``join`` undoes it).

    A stacked leaf with some trainable layers goes to ``trainable``. Subtrees with no leaf
    left are dropped, so e.g. ``frozen`` is ``{}`` under full fine-tuning.
    """
    trainable, frozen = {}, {}
    for path, leaf in walk(params):
        set_path(trainable if np.any(get_path(labels, path)) else frozen, path, leaf)
    return trainable, frozen


def join(trainable: Mapping, frozen: Mapping) -> dict:
    """The full params tree from its two halves. Raises ValueError if a leaf is in both."""
    params: dict = {}
    for tree in (trainable, frozen):
        for path, leaf in walk(tree):
            if has_path(params, path):
                raise ValueError(f"parameter {'/'.join(path)!r} is in both the trainable and the frozen tree")
            set_path(params, path, leaf)
    return params


def layer_masks(trainable: Mapping, labels: Mapping) -> dict:
    """Per trainable leaf: None (all of it trains) or a float32 mask that broadcasts against it.

    A ``[num_layers]`` label becomes ``[num_layers, 1, ...]``; a label with the leaf's number of
    dimensions (``[vocab, 1]``) is kept as it is. 1 marks what trains, 0 what is held still. Use
    it with :func:`apply_layer_masks` on gradients and updates.
    """

    def mask(path, leaf):
        lab = get_path(labels, path)
        if isinstance(lab, np.ndarray) and lab.ndim and not lab.all():
            ndim = len(_shape(leaf))
            shape = lab.shape if lab.ndim == ndim else (-1,) + (1,) * (ndim - 1)
            return lab.astype(np.float32).reshape(shape)
        return None

    return map_paths(mask, trainable)


def apply_layer_masks(tree: Any, masks: Any) -> Any:
    """Zero the frozen layers (or rows) of ``tree`` (gradients or updates shaped like ``trainable``).

    ``jnp.where`` rather than a product, so a NaN or inf elsewhere cannot leak into a
    frozen layer. ``masks=None`` (no partial leaves) returns ``tree`` unchanged.
    """
    if masks is None:
        return tree

    def one(mask, x):
        return x if mask is None else jnp.where(jnp.asarray(mask) > 0, x, jnp.zeros_like(x))

    return jax.tree.map(one, masks, tree, is_leaf=lambda m: m is None)


def summary(params: Mapping, labels: Mapping) -> str:
    """One line: trainable / total parameter counts and the trainable percentage (a partly
    trainable leaf counts its trainable share: the mean of its broadcast label)."""
    total = trainable = 0
    for path, leaf in walk(params):
        size = int(np.prod(_shape(leaf)))
        total += size
        trainable += int(round(size * float(np.mean(get_path(labels, path)))))
    percent = 100.0 * trainable / max(total, 1)
    return f"trainable parameters: {trainable:,} / {total:,} ({percent:.2f}%)"


def _shape(leaf) -> tuple:
    """The logical shape of a leaf (a quantized kernel's is that of the kernel it stands for)."""
    return tuple(getattr(leaf, "full_shape", np.shape(leaf)))


def _is_stacked(path: tuple[str, ...]) -> bool:
    return len(path) > len(STACKED_PREFIX) and path[: len(STACKED_PREFIX)] == STACKED_PREFIX


def _compile(rules: Rules) -> list[tuple[re.Pattern, bool]]:
    if isinstance(rules, str | bytes) or not isinstance(rules, Sequence):
        raise ValueError(f"partition rules must be a sequence of (regex, label) pairs, got {rules!r}")
    compiled = []
    for i, rule in enumerate(rules):
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise ValueError(f"partition rule {i} is {rule!r}; expected a (regex, 'trainable' | 'frozen') pair")
        pattern, label = rule
        if label not in LABELS:
            raise ValueError(f"partition rule {i} ({pattern!r}) has label {label!r}; use 'trainable' or 'frozen'")
        try:
            compiled.append((re.compile(pattern), label == "trainable"))
        except re.error as e:
            raise ValueError(f"partition rule {i}: {pattern!r} is not a valid regex ({e})") from None
    return compiled
