"""Device meshes, logical-axis sharding rules and multi-host plumbing.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``vocab``, ``layers``, ...); a short rules table maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. One device is a 1x1x1 mesh, the same code; a pod is one mesh over
the devices of all hosts, each host running the same program.

    sharding.initialize_distributed()                            # no-op on one host
    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
    shardings = sharding.param_shardings(model, mesh)            # NamedSharding per param
    params = model.init_params(rng, shardings)                   # created in place, never whole
    batch = sharding.put_batch(host_batch, sharding.batch_sharding(mesh))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jft.quant import QuantizedWeight
from jft.tree import get_path

AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated). FSDP shards the embedding width of
# every matrix and its optimizer state; tensor parallelism splits heads, MLP width and vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("experts", None),
    ("layers", None),
)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the other hosts of a multi-host run (``jax.distributed.initialize``); True if joined.

    On a Cloud TPU VM pod (and on SLURM, Open MPI or Kubernetes clusters) JAX finds the
    coordinator itself; elsewhere pass ``coordinator`` ("host:port"), ``num_processes`` and
    ``process_id`` (every process the same coordinator, its own id). On a single host with
    nothing to join this does nothing. Call it before any other JAX call (``jft train`` does);
    without a ``coordinator``, a process that has already used JAX stays on its own.
    """
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (ValueError, RuntimeError) as e:  # no cluster found, or JAX already in use
        if coordinator is None and ("coordinator_address" in str(e) or "must be called before" in str(e)):
            return False
        raise
    return True


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all hosts).

    One size may be -1: the devices left over. Raises ValueError when the sizes do not
    multiply to the device count, naming the sizes and the count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes and at most one -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: {len(devices)} devices are not a multiple of {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} devices, "
            f"but there are {len(devices)}; make the sizes multiply to {len(devices)} (or set one to -1)"
        )
    # Auto axes: XLA propagates shardings through the step from those of params and batch.
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_shardings(model, mesh: Mesh, rules=DEFAULT_RULES, params=None) -> dict:
    """``NamedSharding`` of every parameter of ``model`` (from its logical axes and ``rules``).

    With ``params``, the 4-bit kernels (:class:`jft.quant.QuantizedWeight`) in it get
    :func:`quantized_sharding`. Raises ValueError, before anything is compiled, when a logical
    axis has no rule or a dimension is not divisible by the number of shards it is split into
    (naming the param, the axis and the sizes).
    """
    axes = model.logical_axes()
    shapes = model.param_shapes()
    table = dict(rules)

    def one(path, spec, shape):
        keys = [getattr(k, "key", k) for k in path]
        name = "/".join(map(str, keys))
        if params is not None and isinstance(leaf := get_path(params, keys), QuantizedWeight):
            return quantized_sharding(leaf, mesh, rules, name)
        if len(spec) != len(shape.shape):  # created without logical axes (Compacter's PHM factors): replicated
            spec = (None,) * len(shape.shape)
        mesh_axes = []
        for dim, logical in zip(shape.shape, spec, strict=True):
            if logical is None:
                mesh_axes.append(None)
                continue
            if logical not in table:
                raise ValueError(f"param {name!r}: logical axis {logical!r} has no sharding rule; rules: {rules}")
            target = table[logical]
            n = int(np.prod([mesh.shape[a] for a in ((target,) if isinstance(target, str) else target or ())]))
            if dim % n:
                raise ValueError(
                    f"param {name!r} {shape.shape}: axis {logical!r} of size {dim} does not divide into {n} shards "
                    f"(mesh axis {target!r}); change the mesh or the rule"
                )
            mesh_axes.append(target)
        return NamedSharding(mesh, PartitionSpec(*mesh_axes))

    return jax.tree_util.tree_map_with_path(one, axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def quantized_sharding(q: QuantizedWeight, mesh: Mesh, rules=DEFAULT_RULES, name: str = "kernel"):
    """Shardings of a 4-bit kernel's arrays: the flattened value axis of its codes and block
    scales split over the mesh axes of the ``embed`` rule (FSDP), like the embedding width of a
    full-precision kernel; the per-group and per-matrix double-quantization scales replicated.
    Tensor parallelism does not split 4-bit kernels (blocks run across the ``[out, in]`` rows).
    """
    target = dict(rules).get("embed")
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    n = int(np.prod([mesh.shape[a] for a in axes]))
    for array in (q.codes, q.scales):
        if array.shape[-1] % n:
            raise ValueError(
                f"4-bit param {name!r}: {array.shape[-1]} codes/scales per matrix do not divide into {n} shards "
                f"(mesh axis {target!r}); change the mesh or model.quant_block_size"
            )
    split = NamedSharding(mesh, PartitionSpec(*([None] * (q.codes.ndim - 1)), target if n > 1 else None))
    whole = NamedSharding(mesh, PartitionSpec())
    return q.replace(
        codes=split,
        scales=split,
        scale_scales=None if q.scale_scales is None else whole,
        scale_offset=None if q.scale_offset is None else whole,
    )


def on_mesh(tree, mesh: Mesh):
    """``tree`` with every array that is not yet sharded over ``mesh`` replicated over it (step
    counters, rng keys, optimizer counts), so a whole train state lives on one mesh and a
    checkpoint restores every leaf onto it."""
    whole = NamedSharding(mesh, PartitionSpec())

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), whole)  # from the host: valid on every process of a pod

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES, accum: bool = True) -> NamedSharding:
    """Sharding of train-step batch arrays ``[grad_accum, rows, length]`` (eval batches
    ``[rows, length]`` with ``accum=False``): rows split over the mesh axes of the ``batch`` rule
    (``data`` and ``fsdp``)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((None,) * accum + ("batch", None), rules))


def _local_box(where: NamedSharding, shape: tuple) -> tuple[slice, ...]:
    """The slices of a global array of ``shape`` that this process's devices hold under ``where``."""
    index = list(where.addressable_devices_indices_map(shape).values())
    return tuple(
        slice(min(i[d].indices(n)[0] for i in index), max(i[d].indices(n)[1] for i in index))
        for d, n in enumerate(shape)
    )


def host_rows(sharding: NamedSharding, rows: int, accum: int = 1) -> np.ndarray:
    """Which rows of a host batch ``[rows]`` this process's devices hold once the batch is shaped
    ``[accum, rows // accum]`` (gradient accumulation) and placed with ``sharding`` (of
    :func:`batch_sharding`): indices into the batch, in the order :func:`put_batch` with
    ``rows=`` takes them. All of them on one host; on a pod each host's own share, so it reads
    only those (:class:`jft.data.Batches` ``positions``)."""
    micro = rows // accum
    shape = (accum, micro, 1) if len(sharding.spec) == 3 else (micro, 1)
    box = _local_box(sharding, shape)
    steps = np.arange(accum)[box[0]] if len(shape) == 3 else np.zeros(1, np.int64)
    return (steps[:, None] * micro + np.arange(micro)[box[-2]][None]).reshape(-1)


def put_batch(batch: dict, sharding: NamedSharding, rows: int | None = None) -> dict:
    """Global arrays from a host batch ``{name: numpy array}``. Each process contributes only the
    rows its own devices hold (``jax.make_array_from_process_local_data``); one host contributes
    all. Arrays of any rank from the rows axis on (a per-row scalar, preference pairs ``[rows, 2,
    length]``). Without ``rows`` every process holds the whole batch (the data order is seeded,
    so all hosts agree) and each takes its share; with ``rows`` (the global rows per micro-batch)
    each holds only its share already, as :func:`host_rows` picks it."""

    rows_at = len(sharding.spec) - 2  # the spec is for [(grad_accum,) rows, length]

    def one(x):
        shape = x.shape if rows is None else (*x.shape[:rows_at], rows, *x.shape[rows_at + 1 :])
        # Any rank: rows split as the spec says, the axes after them (length, pair side, ...) whole.
        spec = jax.sharding.PartitionSpec(*sharding.spec[: rows_at + 1], *(None,) * (x.ndim - rows_at - 1))
        where = NamedSharding(sharding.mesh, spec)
        local = np.asarray(x if rows is not None else x[_local_box(where, shape)])
        return jax.make_array_from_process_local_data(where, local, shape)

    return {k: one(v) for k, v in batch.items()}


def to_host(tree):
    """``tree`` with every array as a numpy array on every process (a collective on a pod: all
    processes call it). For writing a sharded model from process 0."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), tree)


def once_per_disk(folder, make):
    """``make()`` on every process, but run first and alone by process 0 where the hosts share
    ``folder``'s disk: process 0 leaves a marker file in ``folder``; a host that sees it (a shared
    disk) waits for process 0's ``make()`` and then calls its own, which finds what process 0 wrote
    (``jft.data.cache.build_cache`` reuses a finished cache); a host that does not (a local disk)
    makes its own while process 0 does. One process: ``make()``. Every process must call it."""
    from pathlib import Path

    if jax.process_count() == 1:
        return make()
    folder = Path(folder).expanduser()
    token = int(multihost_utils.broadcast_one_to_all(np.int32(np.random.default_rng().integers(1 << 30))))
    marker = folder / f".jft-host0-{token}"
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        marker.touch()
    multihost_utils.sync_global_devices("jft once_per_disk: marker written")
    shared = jax.process_index() != 0 and marker.exists()
    out = error = None
    if not shared:
        try:
            out = make()
        except Exception as e:  # the other hosts must still pass the barrier; they fail alike in make()
            error = e
    multihost_utils.sync_global_devices("jft once_per_disk: process 0 done")
    if jax.process_index() == 0:
        marker.unlink()
    if error is not None:
        raise error
    return make() if shared else out


@contextlib.contextmanager
def scope(mesh: Mesh | None, rules=DEFAULT_RULES):
    """Trace-time context in which :func:`constrain` applies its sharding constraints (the train
    and eval steps trace the model inside it); outside one, :func:`constrain` does nothing."""
    if mesh is None:
        yield
        return
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """``x`` constrained to the sharding its logical ``axes`` map to under :func:`scope`, e.g. the
    residual stream to ``("batch", None, None)`` so activations stay split over the batch (data
    parallel) rather than over the FSDP-sharded weight axes."""
    rules = nn.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, nn.logical_to_mesh_axes(axes, rules))
