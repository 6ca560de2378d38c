"""Safetensors files for the whole project: dtypes, headers, weight maps, shards, atomic writes.

A model folder holds ``model.safetensors``, or shards ``model-00001-of-00003.safetensors`` and
``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor:
shard}}``). :func:`weight_map` reads either form, :func:`read_header` a file's tensor names,
dtypes and shapes without loading them; :func:`plan_shards` and :class:`ShardWriter` lay
tensors out in shards of at most ``max_shard_size`` (:func:`parse_size`: bytes or ``"5GB"``).
Every file jft writes goes through :func:`atomic_write`: a reader sees the old file or the new
one, never half of either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Safetensors dtype names <-> numpy dtypes: the float types jft reads and writes.
DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# The parameter dtypes checkpoints are saved in, by their config.json names.
FLOAT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A model folder or file that jft cannot read, with what to do about it."""


# ---------------------------------------------------------------------------- atomic writes


def atomic_write(target, write: Callable) -> None:
    """Write ``target`` (a file or folder) all at once: ``write(tmp)`` fills a hidden temporary
    path in the same folder (same suffix, as some writers append theirs), which then replaces
    ``target`` by a rename. ``target`` may be a ``pathlib`` or ``etils.epath`` path (``tmp`` is
    of the same kind) or a string. A failing ``write`` leaves no temporary file behind."""
    target = target if hasattr(target, "with_name") else Path(target)
    tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}{target.suffix}")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        with contextlib.suppress(OSError):
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()


# ---------------------------------------------------------------------------- whole files


def write_tensors(file, tensors: dict[str, np.ndarray]) -> None:
    """``tensors`` as one safetensors file (``format: pt`` metadata, as transformers and peft
    expect), written atomically."""
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def read_tensors(file) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; :class:`CheckpointError` naming it when it is truncated,
    corrupt or missing."""
    try:
        with safe_open(file, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type: a truncated or corrupt file
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); save or download it again") from e


# ---------------------------------------------------------------------------- shards


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (KB/MB/GB: powers of 1000)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def plan_shards(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Indices of tensors (``sizes`` in bytes, in writing order) grouped into shards: a new shard
    starts when the next tensor would take the current one past ``limit`` (a tensor larger than
    ``limit`` gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """File names of ``n`` shards: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """Write ``model.safetensors.index.json``: tensor name -> shard file name, and the total bytes."""
    body = json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
    atomic_write(Path(folder) / INDEX, lambda tmp: tmp.write_text(body))


def read_index(file: Path) -> dict[str, str]:
    """The weight map (tensor name -> shard file name) of an index file."""
    try:
        return json.loads(Path(file).read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{file}: unreadable or without 'weight_map' ({e})") from e


def weight_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> file of a model folder (sharded or single file). Raises
    :class:`CheckpointError` for a missing shard, a truncated or corrupt file, a folder with
    only pickle checkpoints or none at all."""
    folder = Path(folder)
    index, single = folder / INDEX, folder / SINGLE
    if index.is_file():
        files = {name: folder / f for name, f in read_index(index).items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing; download it again")
        return files
    if single.is_file():
        try:
            with safe_open(single, framework="numpy") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # safetensors' own error type: a truncated or corrupt file
            raise CheckpointError(f"{single}: not a readable safetensors file ({e}); download or save it again") from e
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle checkpoints ({', '.join(pickles)}); jft never unpickles. Convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


# ---------------------------------------------------------------------------- headers


def read_header(file: Path) -> tuple[int, dict]:
    """``(data start, header)`` of a safetensors file without loading any tensor: the header maps
    each name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}`` (offsets
    from the data start) and may hold ``__metadata__``."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _header_bytes(entries: Sequence[tuple[str, tuple, np.dtype]]) -> bytes:
    """The length-prefixed header of a file holding ``entries`` (name, shape, dtype) in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data starts 8-byte aligned
    return len(body).to_bytes(8, "little") + body


class ShardWriter:
    """Safetensors shards of at most ``limit`` bytes, laid out before anything is computed and
    written tensor by tensor, so no output tensor waits in memory; an index if several.
    ``layout``: ``(name, shape, dtype)`` of every output tensor, in the order :meth:`add` gets
    them. Shards are written under temporary names and renamed by :meth:`close`."""

    def __init__(self, out: Path, limit: int, layout: Sequence[tuple]):
        self.out = Path(out)
        self.queue = [(name, tuple(shape), np.dtype(dtype)) for name, shape, dtype in layout]
        sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in self.queue]
        self.shards = [[self.queue[i] for i in shard] for shard in plan_shards(sizes, limit)]
        self.done, self.file, self.files, self.left = 0, None, [], 0

    def add(self, name: str, array: np.ndarray) -> None:
        expected = self.queue[self.done]
        if (name, array.shape, array.dtype) != expected:
            raise ValueError(f"internal: got {name} {array.shape} {array.dtype} to write, expected {expected}")
        if self.file is None:  # the first tensor of the next shard: its header first
            shard = self.shards[len(self.files)]
            self.files.append(self.out / f".shard-{len(self.files):05d}.tmp")
            self.file = open(self.files[-1], "wb")
            self.file.write(_header_bytes(shard))
            self.left = len(shard)
        self.file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self.done += 1
        self.left -= 1
        if not self.left:
            self.file.close()
            self.file = None

    def close(self) -> None:
        if self.done != len(self.queue):
            raise ValueError(f"internal: {len(self.queue) - self.done} planned tensors were not written")
        names = shard_names(len(self.files))
        for tmp, name in zip(self.files, names, strict=True):
            os.replace(tmp, self.out / name)
        if len(names) > 1:
            total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in self.queue)
            write_index(self.out, {e[0]: names[i] for i, shard in enumerate(self.shards) for e in shard}, total)
