"""Device meshes and logical-axis sharding rules.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``vocab``, ``layers``, ...); a short rules table maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. One device is a 1x1x1 mesh, the same code.

    mesh = sharding.make_mesh(data=-1, fsdp=1, tensor=1)
    shardings = sharding.param_shardings(model, mesh)            # NamedSharding per param
    params = jax.device_put(params, shardings)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jft.quant import QuantizedWeight

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
    ("layers", None),
)


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

    With ``params``, 4-bit kernels (:class:`jft.quant.QuantizedWeight`) in it are replicated
    (their codes have no logical axes yet). Raises ValueError, before anything is compiled,
    when a logical axis has no rule or a dimension is not divisible by the number of shards it
    is split into (naming the param, the axis and the sizes).
    """
    axes = model.logical_axes()
    shapes = model.param_shapes()
    table = dict(rules)

    def one(path, spec, shape):
        if params is not None and isinstance(_at(params, path), QuantizedWeight):
            return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), _at(params, path))
        name = "/".join(str(getattr(k, "key", k)) for k in path)
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


def _at(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", k)]
    return tree


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of train-step batch arrays ``[grad_accum, rows, length]``: rows split over the
    mesh axes of the ``batch`` rule (``data`` and ``fsdp``)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((None, "batch", None), rules))
