"""mergekit's YAML merge config: reading it, checking its keys and slices, and resolving each
parameter for one tensor (per-layer gradients, name filters, the scopes model > slice > top)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jft.safetensors_io import FLOAT_DTYPES


class MergeError(ValueError):
    """A merge config or input model that cannot be merged, naming the key, model or tensor."""


TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source")


def load_merge_config(source: str | os.PathLike) -> dict:
    """A merge config from a YAML file, or from YAML text: a string that holds a newline or
    names no existing file is parsed as YAML itself. Checked further by :func:`merge_folders`
    (or :func:`merge_moe`); raises :class:`MergeError` for invalid YAML or one that is not a mapping."""
    import yaml

    text_given = isinstance(source, str) and ("\n" in source or not Path(source).is_file())
    where = "merge config" if text_given else str(source)
    try:
        config = yaml.safe_load(source if text_given else Path(source).read_text())
    except yaml.YAMLError as e:
        raise MergeError(f"{where}: not valid YAML: {e}") from None
    if text_given and isinstance(config, str) and "\n" not in source:
        raise MergeError(f"{source}: no such file, and not YAML text with merge_method, models or slices, ...")
    if not isinstance(config, dict):
        raise MergeError(f"{where}: expected a mapping with merge_method, models or slices, ...")
    return config


def evaluate_setting(setting, name: str, t: float):
    """A parameter's value for tensor ``name`` at depth ``t`` in [0, 1] (mergekit's rules): a
    scalar as is; a list of numbers interpolated linearly at ``t`` (a gradient; a list of other
    scalars picks ``values[int(t * (n - 1))]``); ``{filter, value}`` entries (or a list of them):
    the first whose filter is absent, ``*`` or a substring of ``name``. None when nothing applies."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list):
        raise MergeError(f"parameter value {setting!r}: use a number, a list (gradient) or {{filter, value}} entries")
    if not setting:
        return None
    if all(isinstance(v, (bool, int, float, str)) for v in setting):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"value", "filter"}:
            raise MergeError(f"parameter entry {cond!r}: each entry of a filtered parameter is {{filter, value}}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in name:
            return evaluate_setting(cond["value"], name, t)
    return None


@dataclasses.dataclass
class Slice:
    """Layers taken from one or more models side by side (``models`` is one slice over all layers)."""

    sources: list  # [(model ref, start, stop (None: all layers), parameters)]
    parameters: dict
    base: str | None


def slices(config: dict) -> list[Slice]:
    """The config's ``slices`` (or its ``models`` as one slice over all layers), checked."""
    has_models, has_slices = bool(config.get("models")), bool(config.get("slices"))
    if has_models == has_slices:
        raise MergeError("give either models or slices (not both, not neither)")
    if has_models:
        sources = []
        for i, m in enumerate(config["models"]):
            _keys(m, {"model", "parameters"}, f"models[{i}]")
            sources.append((m["model"], 0, None, m.get("parameters") or {}))
        base = config.get("base_model")
        if base and base not in [s[0] for s in sources]:
            sources.append((base, 0, None, {}))
        return [Slice(sources, {}, None)]
    out = []
    for i, sl in enumerate(config["slices"]):
        _keys(sl, {"sources", "parameters", "base_model"}, f"slices[{i}]")
        sources = []
        for j, s in enumerate(sl.get("sources") or []):
            _keys(s, {"model", "layer_range", "parameters"}, f"slices[{i}].sources[{j}]")
            rng = s.get("layer_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) for x in rng)):
                raise MergeError(f"slices[{i}].sources[{j}].layer_range: expected [start, stop], got {rng!r}")
            sources.append((s["model"], rng[0], rng[1], s.get("parameters") or {}))
        if not sources:
            raise MergeError(f"slices[{i}]: no sources")
        out.append(Slice(sources, sl.get("parameters") or {}, sl.get("base_model")))
    return out


def _keys(entry, allowed: set, where: str) -> None:
    if not isinstance(entry, dict) or "model" in allowed and "model" not in entry:
        raise MergeError(
            f"{where}: expected a mapping with 'model'" if "model" in allowed else f"{where}: expected a mapping"
        )
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise MergeError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def source_params(sl: Slice, ref: str) -> dict:
    """The ``parameters`` a slice gives model ``ref`` (empty when none)."""
    return next((s[3] for s in sl.sources if s[0] == ref), {})


def resolve_param(param, default, scopes, name, t, method, model=None):
    """Parameter ``param`` for tensor ``name`` at depth ``t``: the first scope (a ``parameters``
    dict, innermost first) that sets it for this tensor, else ``default``; :class:`MergeError`
    when there is neither (``default`` None: required)."""
    for scope in scopes:
        if scope and param in scope:
            value = evaluate_setting(scope[param], name, t)
            if value is not None:
                return value
    if default is None:
        where = f"model {model}, tensor {name!r}" if model else f"tensor {name!r}"
        raise MergeError(f"merge_method {method}: parameter {param!r} is missing for {where}")
    return default


def dtype_of(name, key):
    """The numpy dtype a config's ``dtype`` / ``out_dtype`` names (None when unset)."""
    if name is None:
        return None
    if name not in FLOAT_DTYPES:
        raise MergeError(f"{key}: {name!r} is not supported; use one of {list(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]
