"""``jft plan``: the memory a run's config needs on each device, from shapes alone.

    from jft.config import load_config
    from jft.plan import format_plan, plan

    report = plan(load_config("configs/qlora_llama.py"), size="llama-3-8b")
    print(format_plan(report))              # params, bytes per device, fits / does not fit

Nothing is read but ``config.json`` (or a built-in table of shapes), and nothing is allocated or
compiled. Every number that the code decides comes from the code: parameter shapes from tracing
the model's init (:func:`jax.eval_shape`, PEFT leaves included), 4-bit kernels from tracing
:func:`jft.quant.quantize`, what trains from :mod:`jft.partition` / :mod:`jft.peft` labels, the
optimizer state from tracing the run's own optax chain, and each device's shard from
:func:`jft.sharding.param_shardings` on an abstract mesh of the config's sizes. Activations are a
model of what the train step keeps for its backward pass (``docs/memory.md``), held to XLA's
compiled memory analysis of the real step in ``tests/test_plan.py``.

The transient memory of a step has two phases that are never live at once: the backward pass
(activations, the gradients being written) and the optimizer update (gradients, one float32
buffer per trained parameter). The total is the persistent state plus the larger phase.
"""

from __future__ import annotations

from jft.plan.activations import _estimate, _generation, _teacher
from jft.plan.shapes import SIZES, _model_source
from jft.plan.state import _state

__all__ = ["DEVICES", "HEADROOM", "SIZES", "format_plan", "plan"]

GiB = 2**30

# name -> (bytes per device, platform); the memory a chip has, not what a runtime leaves free.
DEVICES: dict[str, tuple[int, str]] = {
    "T4": (16 * GiB, "gpu"),
    "A100-40GB": (40 * GiB, "gpu"),
    "A100-80GB": (80 * GiB, "gpu"),
    "H100": (80 * GiB, "gpu"),
    "v5e": (16 * GiB, "tpu"),
    "v4": (32 * GiB, "tpu"),
    "v5p": (95 * GiB, "tpu"),
}
# A plan fits when it needs at most this share of a device: the rest is for the runtime, XLA's own
# scratch (collectives, cuDNN workspaces), fragmentation and the error of the activation model.
HEADROOM = 0.9


def plan(
    config, size: str | dict | None = None, devices=None, *, num_devices: int | None = None, platform=None
) -> dict:
    """The memory the train step of ``config`` needs per device, without loading or compiling.

    Args:
      config: a run config (:func:`jft.config.load_config`, overrides applied).
      size: a name in :data:`SIZES` (``"llama-3-8b"``): that model's shapes instead of
        ``model.path``'s ``config.json``. Without it: ``model.path``'s ``config.json`` (a local
        folder, or the Hugging Face cache), else a hub id whose name is in the table, else the new
        model of ``model.new`` when ``model.path`` is empty.
      devices: names in :data:`DEVICES` to check (default all); ``"A100"`` means both A100s.
      num_devices: devices of the mesh, which fills the config's ``-1`` mesh size (default: the
        product of the fixed sizes, i.e. the ``-1`` size counts 1).
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``: estimate for this backend only (what
        ``model.compute_dtype="auto"`` and ``model.attention="auto"`` resolve to); default: the
        platforms of ``devices``.

    Returns a dict: ``model`` (shapes and where they came from), ``method``, ``params``
    (``total``, ``trainable``; ``with_state``: the parameters that carry gradients and optimizer
    state, which counts whole layer stacks that train in part), ``mesh``, ``batch``,
    ``estimates`` (per platform: bytes per device of ``weights``, ``optimizer``, ``batch``,
    ``gradients``, ``activations``, ``update`` and ``total``, with a ``detail`` of each),
    ``devices`` (name, memory, platform, needed bytes, ``fits``: "yes", "tight" or "no") and
    ``notes``. Raises :class:`jft.config.ConfigError` for a config the trainer would refuse
    (a batch or mesh that does not split, a 4-bit base without PEFT) or a model it cannot size.
    """
    from jft.config import ConfigError, check

    check(config, values=False)
    cfg = config
    chosen = _devices(devices)
    platforms = [platform] if platform else sorted({DEVICES[d][1] for d in chosen})
    for p in platforms:
        if p not in ("cpu", "gpu", "tpu"):
            raise ConfigError(f"platform={p!r}; choose cpu, gpu or tpu")
    notes: list[str] = []
    if cfg.model.quantize and not cfg.peft.methods:
        raise ConfigError("model.quantize (QLoRA) needs peft.methods to train: a 4-bit base is frozen")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not a multiple of grad_accum={cfg.train.grad_accum}"
        )

    hf, source = _model_source(cfg, size, notes)
    state = _state(cfg, hf, num_devices, notes)
    estimates = {p: _estimate(cfg, state, p, notes) for p in platforms}
    if cfg.distill.teacher and cfg.task != "distill":  # jft distill: the teacher answers first
        teacher = _teacher(cfg, state, notes)
        for p in platforms:
            estimates[p]["generation"] = _generation(cfg, state, teacher, p)
    out = {
        "model": {"source": source, **state["shape"]},
        "method": state["method"],
        "params": state["params"],
        "mesh": state["mesh"],
        "batch": state["batch"],
        "estimates": estimates,
        "devices": [],
        "notes": notes,
    }
    for name in chosen:
        memory, kind = DEVICES[name]
        est = out["estimates"][platform or kind]
        need = max(est["total"], est.get("generation", {}).get("total", 0))
        fits = "yes" if need <= HEADROOM * memory else "tight" if need <= memory else "no"
        out["devices"].append(
            {"name": name, "memory": memory, "platform": kind, "needed": need, "fits": fits, "free": memory - need}
        )
    if any(d["platform"] == "gpu" and d["needed"] > 0.75 * d["memory"] for d in out["devices"]):
        notes.append(
            "GPU: JAX takes 75% of the memory by default; for a plan above that, run with "
            "XLA_PYTHON_CLIENT_MEM_FRACTION=.95"
        )
    return out


def _devices(devices) -> list[str]:
    from jft.config import ConfigError

    if devices is None:
        return list(DEVICES)
    if isinstance(devices, str):
        devices = [devices]
    names = []
    for want in devices:
        key = want.lower().replace("_", "-")
        hits = [n for n in DEVICES if n.lower() == key or n.lower().startswith(key + "-")]
        hits = hits or [n for n in DEVICES if n.lower().replace("gb", "") == key]
        if not hits:
            raise ConfigError(f"unknown device {want!r}; choose from {list(DEVICES)}")
        names += [n for n in hits if n not in names]
    return names


# ---------------------------------------------------------------------------- the table


def format_plan(report: dict) -> str:
    """A plain-text table of :func:`plan`'s report: what is counted, bytes per device, fits."""
    m, p, mesh, b = report["model"], report["params"], report["mesh"], report["batch"]
    lines = [
        f"model: {m['model_type']}, {m['layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
        f"heads {m['heads']}/{m['kv_heads']} (q/kv), vocab {m['vocab_size']}"
        + (", tied embeddings" if m["tied_embeddings"] else ""),
        f"  from: {m['source']}",
        f"method: {report['method']}",
        f"parameters: {p['total']:,} total, {p['trainable']:,} trainable "
        f"({100 * p['trainable'] / max(p['total'], 1):.2f}%)"
        + (f"; {p['with_state']:,} with gradients and optimizer state" if p["with_state"] != p["trainable"] else ""),
        f"mesh: data {mesh['data']} x fsdp {mesh['fsdp']} x tensor {mesh['tensor']} = {mesh['devices']} devices",
        f"batch: {b['rows_per_step']} rows per step in {b['grad_accum']} micro-batch(es) of {b['micro_batch']}; "
        f"{b['sequences_per_device']} sequences of {b['seq_len']} tokens per device",
        "",
    ]
    estimates = report["estimates"]
    names = list(estimates)
    rows = [
        ("compute dtype", lambda e: e["compute_dtype"]),
        ("attention", lambda e: e["attention"]),
        ("weights", lambda e: _size(e["weights"])),
        ("optimizer state", lambda e: _size(e["optimizer"])),
        ("gradients", lambda e: _size(e["gradients"])),
        ("activations (backward)", lambda e: _size(e["activations"])),
        ("  saved across layers", lambda e: _size(e["detail"]["saved_for_backward"])),
        ("optimizer update (transient)", lambda e: _size(e["update"])),
        ("batch", lambda e: _size(e["batch"])),
        ("total per device", lambda e: _size(e["total"])),
    ]
    if any("generation" in e for e in estimates.values()):  # jft distill: the teacher answers first
        gen = lambda key: lambda e: _size(e["generation"][key])
        rows += [
            ("jft distill, generation:", lambda e: ""),
            ("  teacher weights", gen("weights")),
            ("  KV cache", gen("kv_cache")),
            ("  prefill activations", gen("prefill")),
            ("  generation total", gen("total")),
        ]
    width = max(len(r[0]) for r in rows) + 2
    lines.append("per device".ljust(width) + "".join(f"{n:>16}" for n in names))
    for label, get in rows:
        lines.append(label.ljust(width) + "".join(f"{get(estimates[n]):>16}" for n in names))
    lines.append("(total = weights + optimizer state + batch + gradients + the larger of activations and update)")
    if any("generation" in e for e in estimates.values()):
        lines.append(
            f"(generation: teacher {next(iter(estimates.values()))['generation']['teacher']}; "
            "a device needs the larger phase)"
        )
    lines.append("")
    lines.append(f"{'device':<12}{'memory':>10}{'needs':>12}{'free':>12}  fits (at most {HEADROOM:.0%} of memory)")
    for dev in report["devices"]:
        sizes = f"{_size(dev['memory']):>10}{_size(dev['needed']):>12}{_size(dev['free']):>12}"
        lines.append(f"{dev['name']:<12}{sizes}  {dev['fits']}")
    if report["notes"]:
        lines.append("")
        lines += [f"note: {n}" for n in dict.fromkeys(report["notes"])]
    return "\n".join(lines)


def _size(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
