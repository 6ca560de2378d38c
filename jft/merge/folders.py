"""Merging Hugging Face model folders as a mergekit YAML says, streamed tensor by tensor."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import jax
import numpy as np

from jft import safetensors_io as sio
from jft.hf import read_config_json, resolve
from jft.merge.config import (
    TOP_KEYS,
    MergeError,
    dtype_of,
    resolve_param,
    slices,
    source_params,
)
from jft.merge.methods import METHODS, merge_tensor

ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOKENIZER_FILES = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|.*\.model|chat_template\..*"
    r"|generation_config\.json)$"
)


@dataclasses.dataclass
class Model:
    """An input model folder: its config, and its safetensors read one tensor at a time."""

    ref: str
    folder: Path
    config: dict
    files: dict  # tensor name -> file
    headers: dict = dataclasses.field(default_factory=dict)  # file -> (data start, header)

    @classmethod
    def open(cls, ref) -> Model:
        """Model ``ref`` (a folder or hub id); :class:`jft.hf.CheckpointError` for a missing or
        malformed config.json or unreadable weights."""
        folder = resolve(ref)
        return cls(str(ref), folder, read_config_json(folder), sio.weight_map(folder))

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def tensor(self, name: str, dtype) -> np.ndarray:
        """Tensor ``name`` (cast to ``dtype`` unless None), read into a fresh array: no file stays
        mapped into memory, so a merge holds only the tensors it is working on."""
        shape, stored, file, start, begin = self._info(name)
        x = np.empty(shape, stored)
        with open(file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(memoryview(x.reshape(-1).view(np.uint8))) != x.nbytes:
                raise MergeError(f"{file}: tensor {name!r} is truncated")
        return x if dtype is None else x.astype(dtype, copy=False)

    def spec(self, name: str, dtype=None) -> tuple[tuple, np.dtype]:
        """``(shape, dtype)`` of tensor ``name`` as :meth:`tensor` returns it, from the file header."""
        shape, stored = self._info(name)[:2]
        return shape, np.dtype(dtype or stored)

    def _info(self, name: str):
        if name not in self.files:
            raise MergeError(f"model {self.ref}: tensor {name!r} is missing ({self.folder})")
        file = self.files[name]
        if file not in self.headers:
            self.headers[file] = sio.read_header(file)
        start, header = self.headers[file]
        info = header[name]
        if info["dtype"] not in sio.DTYPES:
            raise MergeError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which merges do not take")
        return tuple(info["shape"]), sio.DTYPES[info["dtype"]], file, start, info["data_offsets"][0]


def merge_folders(config: dict, out_dir: str | os.PathLike, seed: int = 0, max_shard_size: int | str = "5GB") -> Path:
    """Merge Hugging Face model folders as a mergekit-style ``config`` says, into ``out_dir``.

    Streams tensor by tensor: each output tensor is computed from the matching tensor of every
    input and written into the current shard, so host memory holds about one shard plus one
    tensor per input. ``seed`` makes the random methods (DARE, DELLA) reproducible. Writes
    config.json (layer count updated), safetensors and the tokenizer (``tokenizer_source``:
    ``base`` (default) or a model). Raises :class:`MergeError` for unknown keys or methods,
    missing parameters, models of different architectures or tensor shapes, and
    :class:`jft.hf.CheckpointError` for an input without a readable config.json or weights.
    """
    unknown = sorted(set(config) - set(TOP_KEYS))
    if unknown:
        raise MergeError(f"unknown key(s) {unknown} in the merge config; jft reads {list(TOP_KEYS)}")
    method = config.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"merge_method {method!r} is not supported; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    uses_base = spec.needs_base or spec.optional_base
    if config.get("tokenizer_source") == "union":
        raise MergeError(
            "tokenizer_source: union is not supported: jft merges models of one vocabulary and would have to "
            "build a new tokenizer and new embedding rows; use tokenizer_source: base (the default) or a model "
            "whose tokenizer all inputs share"
        )
    out = check_out(out_dir)
    dtype = dtype_of(config.get("dtype"), "dtype")
    plan_slices = slices(config)
    base_ref = config.get("base_model")
    refs = [*(s[0] for sl in plan_slices for s in sl.sources), *([base_ref] if base_ref else [])]
    models = {ref: Model.open(ref) for ref in dict.fromkeys(refs)}
    for sl in plan_slices:  # the models form covers every layer
        sl.sources = [(r, a, models[r].num_layers if b is None else b, p) for r, a, b, p in sl.sources]
        base = sl.base or base_ref
        if spec.needs_base and base is None:
            raise MergeError(f"merge_method {method} needs a base_model")
        if uses_base and base is not None and base not in [r for r, *_ in sl.sources]:
            raise MergeError(f"base_model {base} is not among the sources of slice {[s[:3] for s in sl.sources]}")
    reference = models[base_ref or plan_slices[0].sources[0][0]]
    for m in models.values():
        diff = [k for k in ARCH_KEYS if m.config.get(k) != reference.config.get(k)]
        if diff:
            raise MergeError(
                f"model {m.ref} differs from {reference.ref} in {diff} "
                f"({[m.config.get(k) for k in diff]} vs {[reference.config.get(k) for k in diff]}); "
                "merged models must share one architecture"
            )
    for sl in plan_slices:
        for ref, start, stop, _ in sl.sources:
            if not 0 <= start < stop <= models[ref].num_layers:
                raise MergeError(
                    f"layer_range [{start}, {stop}] of {ref}: it has {models[ref].num_layers} layers; "
                    "use 0 <= start < stop <= layers"
                )
        if len({stop - start for _, start, stop, _ in sl.sources}) > 1:
            raise MergeError(f"slice {[s[:3] for s in sl.sources]}: every source of a slice needs as many layers")
    out_dtype = dtype_of(config.get("out_dtype"), "out_dtype") or dtype

    # The plan: (output name, slice, [(model, input name)], t).
    layer_suffixes = list(dict.fromkeys(m.group(2) for n in reference.files if (m := _LAYER.match(n))))
    outer = [n for n in reference.files if not _LAYER.match(n) and not n.endswith("rotary_emb.inv_freq")]
    first, last = plan_slices[0], plan_slices[-1]
    plan = [(n, first, [(s[0], n) for s in first.sources], 0.0) for n in outer if "embed_tokens" in n]
    layer = 0
    for sl in plan_slices:
        length = sl.sources[0][2] - sl.sources[0][1]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for suffix in layer_suffixes:
                inputs = [(s[0], f"model.layers.{s[1] + idx}.{suffix}") for s in sl.sources]
                plan.append((f"model.layers.{layer}.{suffix}", sl, inputs, t))
            layer += 1
    plan += [(n, last, [(s[0], n) for s in last.sources], 0.0) for n in outer if "embed_tokens" not in n]

    layout = []
    for name, _, inputs, _ in plan:
        shape, stored = models[inputs[0][0]].spec(inputs[0][1], dtype)
        layout.append((name, shape, out_dtype or stored))
    writer = sio.ShardWriter(out, sio.parse_size(max_shard_size), layout)
    key = jax.random.key(seed)
    with filling(out), jax.default_device(jax.local_devices(backend="cpu")[0]):
        for (name, sl, inputs, t), (_, _, written) in zip(plan, layout, strict=True):
            base = sl.base or base_ref
            tensors = {ref: models[ref].tensor(n, dtype) for ref, n in inputs}
            shapes = {ref: x.shape for ref, x in tensors.items()}
            if len(set(shapes.values())) > 1:
                raise MergeError(f"tensor {name!r}: shapes differ between models: {shapes}")
            scopes = [sl.parameters, config.get("parameters")]
            shared = {p: resolve_param(p, d, scopes, name, t, method) for p, d in spec.shared.items()}
            others = [r for r in tensors if not (uses_base and r == base)]
            per_model = [
                {
                    p: resolve_param(p, d, [source_params(sl, r), *scopes], name, t, method, r)
                    for p, d in spec.per_model.items()
                }
                for r in others
            ]
            rng = jax.random.fold_in(key, zlib.crc32(name.encode()))
            try:
                merged = merge_tensor(
                    method,
                    tensors.get(base) if uses_base else None,
                    [tensors[r] for r in others],
                    shared,
                    per_model,
                    rng,
                )
            except MergeError:
                raise
            except ValueError as e:  # the math's own checks (input counts, parameter ranges)
                raise MergeError(f"merge_method {method}, tensor {name!r}: {e}") from e
            writer.add(name, np.asarray(merged).astype(written, copy=False))
        writer.close()

    cfg = dict(reference.config)
    cfg["num_hidden_layers"] = layer
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = [
            models[s[0]].config["layer_types"][s[1] + i]
            for sl in plan_slices
            for s in sl.sources[:1]
            for i in range(s[2] - s[1])
        ]
    if out_dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(np.dtype(out_dtype).name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    source = config.get("tokenizer_source") or "base"
    copy_tokenizer(models[base_ref or reference.ref].folder if source == "base" else resolve(source), out)
    return out


def check_out(out_dir) -> Path:
    """``out_dir`` as a Path; :class:`MergeError` when it exists and is not empty."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out} is not empty; merge into a new folder")
    return out


@contextlib.contextmanager
def filling(out: Path):
    """Create the (new or empty) output folder; empty it again if the merge fails midway."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for f in out.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        raise


def copy_tokenizer(folder: Path, out: Path) -> None:
    """Copy the tokenizer files (and generation_config.json) of ``folder`` into ``out``."""
    for f in folder.iterdir():
        if f.is_file() and _TOKENIZER_FILES.match(f.name):
            shutil.copy2(f, out / f.name)
