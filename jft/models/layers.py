"""Building blocks shared by the decoder families: Linear, RMSNorm, RoPE, KV cache (attention: attention.py).

Every parameter is created with logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``; ``layers`` is added by the layer scan) so that
one rules table can later map them onto a device mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jft.models.peft_spec import LinearPeft
from jft.quant import QuantizedWeight, dequantize, dequantize_t

Array = jax.Array

default_init = nn.initializers.normal(stddev=0.02)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, kernel: Array, out_dtype) -> Array:
    """``x @ kernel`` (``[..., in] x [in, out]``) accumulated in ``out_dtype``."""
    return jnp.matmul(x, kernel, preferred_element_type=out_dtype)


def _dense_fwd(x, kernel, out_dtype):
    return dense(x, kernel, out_dtype), (x, kernel)


def _dense_bwd(out_dtype, res, g):
    x, kernel = res
    # The barrier keeps XLA from fusing the (transposed) copy of g that the weight-gradient
    # matmul reads into the elementwise ops producing g, which XLA:CPU runs very slowly.
    g = jax.lax.optimization_barrier(g)
    dx = jnp.matmul(g, kernel.T.astype(g.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    dk = jax.lax.dot_general(x2, g2.astype(x2.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dk.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def qdense(x: Array, q: QuantizedWeight, dtype, out_dtype) -> Array:
    """``x @ dequantize(q)`` for a 4-bit kernel: the weight is dequantized (to ``dtype``) inside
    the matmul's fusion, never stored; the backward pass dequantizes it again and returns the
    gradient of ``x`` only (a quantized base is frozen)."""
    w = dequantize_t(q, dtype)  # [out, in]
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def _qdense_fwd(x, q, dtype, out_dtype):
    return qdense(x, q, dtype, out_dtype), q


def _qdense_bwd(dtype, out_dtype, q, g):
    dx = jnp.matmul(g.astype(dtype), dequantize_t(q, dtype), preferred_element_type=jnp.float32).astype(dtype)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0) if a.dtype == np.uint8 else jnp.zeros_like(a)
    return dx, jax.tree.map(zero, q)


qdense.defvjp(_qdense_fwd, _qdense_bwd)


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up``; the backward pass keeps only ``gate`` and ``up`` (not the sigmoid
    and product intermediates that autodiff would save for every layer)."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * (sig + silu * (1 - sig)), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` with kernel ``[in, out]`` and logical axes ``axes``.

    ``out_dtype`` lets the lm_head accumulate and return float32 logits from bf16 inputs
    without materialising a float32 copy of its kernel. ``peft`` adds, when set:

    - LoRA: ``+ s * (dropout(x) @ lora_a) @ lora_b`` (``lora_a [in, r]``, ``lora_b [r, out]``
      zero-initialised; ``A B`` is never formed). Dropout is active only when the caller
      passes a ``dropout`` rng (training).
    - DoRA: ``lora_magnitude [out]`` rescales each output column of ``W + s A B`` to that
      norm; the norm is a constant in the backward pass, as in the DoRA paper.
    - IA3: ``ia3 [out]`` scales the output (bias included), or ``ia3 [in]`` the input.

    The kernel may be a :class:`jft.quant.QuantizedWeight` (QLoRA's frozen 4-bit base).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    out_dtype: Any = None
    peft: LinearPeft | None = None
    kernel_init: Callable = default_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p, dt = self.peft or LinearPeft(), self.dtype
        n_in = x.shape[-1]
        param = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype
        )
        kernel = self.get_variable("params", "kernel")
        if not isinstance(kernel, QuantizedWeight):  # a 4-bit kernel has no [in, out] array to check
            kernel = param("kernel", self.kernel_init, (n_in, self.features), self.axes)
        out_dtype = jnp.dtype(self.out_dtype or dt)
        x = x.astype(dt)
        if p.ia3 == "in":
            x = x * param("ia3", nn.initializers.ones_init(), (n_in,), self.axes[:1]).astype(dt)

        def matmul(inputs):
            if isinstance(kernel, QuantizedWeight):
                return qdense(inputs, kernel, dt, out_dtype)
            return dense(inputs, kernel.astype(dt), out_dtype)

        y = matmul(x)
        if p.r:
            a_init = lora_a_init(p.init, p.r)
            a = param("lora_a", a_init, (n_in, p.r), (self.axes[0], None)).astype(dt)
            b = param("lora_b", nn.initializers.zeros_init(), (p.r, self.features), (None, self.axes[1])).astype(dt)
            x_drop = x
            if p.dropout and self.has_rng("dropout"):
                x_drop = nn.Dropout(p.dropout, deterministic=False)(x)
            lora = dense(dense(x_drop, a, dt), b, out_dtype)
            if p.dora:
                magnitude = param("lora_magnitude", nn.initializers.ones_init(), (self.features,), self.axes[1:])
                norm = jax.lax.stop_gradient(dora_column_norm(kernel, a, b, p.scale))
                m = (magnitude.astype(jnp.float32) / norm).astype(out_dtype)
                base = y if x_drop is x else matmul(x_drop)
                y = y + (m - 1) * base + m * p.scale * lora
            else:
                y = y + p.scale * lora
        if self.use_bias:
            y = y + param("bias", nn.initializers.zeros_init(), (self.features,), self.axes[1:]).astype(out_dtype)
        if p.ia3 == "out":
            y = y * param("ia3", nn.initializers.ones_init(), (self.features,), self.axes[1:]).astype(out_dtype)
        return y


def lora_a_init(kind: str, r: int) -> Callable:
    """peft's initialisations of ``A [..., in, r]``: U(+-1/sqrt(in)) (``uniform``) or N(0, 1/r)."""
    if kind == "gaussian":
        return nn.initializers.normal(stddev=1.0 / r)

    def uniform(rng, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(shape[-2])
        return jax.random.uniform(rng, shape, dtype, -bound, bound)

    return uniform


def dora_column_norm(kernel: Array, a: Array, b: Array, scale: float) -> Array:
    """``||W + s A B||`` per output column ``[out]`` (float32), without forming ``A B``:
    ``|W_o|^2 + 2 s (A^T W)_o . B_o + s^2 B_o^T (A^T A) B_o``."""
    if isinstance(kernel, QuantizedWeight):
        kernel = dequantize(kernel, jnp.float32)
    w, a, b = (t.astype(jnp.float32) for t in (kernel, a, b))
    sq = jnp.sum(w * w, axis=0) + 2 * scale * jnp.sum((a.T @ w) * b, axis=0)
    sq = sq + scale**2 * jnp.sum(b * ((a.T @ a) @ b), axis=0)
    return jnp.sqrt(jnp.maximum(sq, 0.0))


ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "tanh": jnp.tanh}


class PHMLinear(nn.Module):
    """Compacter's parameterised hypercomplex layer: ``x @ sum_i kron(rule_i, s_i @ t_i) + b``.

    ``rule [n, n, n]`` is shared (passed in); ``s [n, in/n, k]`` and ``t [n, k, out/n]`` are
    this layer's. ``zero`` starts ``t`` at zero (the adapter's up projection).
    """

    features: int
    rank: int
    zero: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, rule: Array) -> Array:
        n = rule.shape[0]
        n_in, n_out = x.shape[-1], self.features
        std = nn.initializers.normal(stddev=0.02**0.5)
        s = self.param("phm_s", std, (n, n_in // n, self.rank), self.param_dtype)
        t_init = nn.initializers.zeros_init() if self.zero else std
        t = self.param("phm_t", t_init, (n, self.rank, n_out // n), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (n_out,), self.param_dtype)
        blocks = jnp.einsum("ipk,ikq->ipq", s, t)  # [n, in/n, out/n]
        # kron(rule_i, B_i)[a*p + c, b*q + d] = rule_i[a, b] * B_i[c, d]
        kernel = jnp.einsum("iab,icd->acbd", rule, blocks).reshape(n_in, n_out)
        return dense(x.astype(self.dtype), kernel.astype(self.dtype), jnp.dtype(self.dtype)) + bias.astype(self.dtype)


class Bottleneck(nn.Module):
    """A bottleneck adapter ``h + up(f(down(h)))`` (``up`` zero-initialised: starts as identity).

    With ``phm_rule`` (Compacter) both projections are :class:`PHMLinear` layers.
    """

    spec: Any  # jft.peft.Adapter
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, phm_rule: Array | None) -> Array:
        spec, dims = self.spec, h.shape[-1]
        width = dims // spec.reduction_factor
        act = ACTIVATIONS[spec.nonlinearity]
        if phm_rule is None:
            kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
            z = act(Linear(width, ("embed", None), name="down", **kw)(h))
            out = Linear(dims, (None, "embed"), kernel_init=nn.initializers.zeros_init(), name="up", **kw)(z)
        else:
            kw = dict(rank=spec.phm_rank, dtype=self.dtype, param_dtype=self.param_dtype)
            z = act(PHMLinear(width, name="down", **kw)(h, phm_rule))
            out = PHMLinear(dims, zero=True, name="up", **kw)(z, phm_rule)
        return h + out.astype(h.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face Llama does."""

    eps: float
    axis_name: str = "embed"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


# ---------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32) for the rope type in ``scaling``.

    Supported types: ``default``, ``linear`` (positions divided by ``factor``) and
    ``llama3`` (low frequencies divided by ``factor``, a smooth ramp between).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope_type!r}: jft supports 'default', 'linear' and 'llama3'")


def rope_angles(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos and sin, each ``[batch, length, head_dim // 2]`` float32, for integer positions."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd: Array, cos: Array, sin: Array) -> Array:
    """Rotate the two halves of the head dimension (the Hugging Face "rotate_half" layout)."""
    x = x_bthd.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthd.dtype)


def segment_positions(segment_ids: Array) -> Array:
    """Position of each token inside its segment: ``[0, 1, 2, 0, 1, ...]`` for packed rows."""
    t = segment_ids.shape[-1]
    idx = jnp.arange(t)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


@flax.struct.dataclass
class KVCache:
    """Keys and values of all layers for incremental decoding.

    k, v: ``[layers, batch, kv_heads, length, head_dim]``; mask: ``[batch, length]`` bool,
    True where a real token was written; index: int32 scalar, the next slot to write.
    Every row writes at the same slot, so prompts of different lengths are left-padded.
    ``empty`` is static: a fresh cache is known to hold nothing, so the first call (the
    prefill) attends to its own tokens only instead of to ``length`` empty slots.
    """

    k: Array
    v: Array
    mask: Array
    index: Array
    empty: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype: Any):
        shape = (layers, batch, kv_heads, length, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch, length), bool),
            index=jnp.zeros((), jnp.int32),
            empty=True,
        )

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def write(self, k: Array, v: Array, valid: Array) -> KVCache:
        """Store the new tokens' keys/values ``[layers, batch, kv_heads, t, head_dim]`` at ``index``.

        The caller sizes the cache: ``index + t`` must not exceed ``length`` (inside jit the
        write position cannot be checked, and XLA would clamp it, overwriting the last slots).
        """
        at = (0, 0, 0, self.index, 0)
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
            mask=jax.lax.dynamic_update_slice(self.mask, valid, (0, self.index)),
            index=self.index + k.shape[3],
        )
