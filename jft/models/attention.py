"""Attention: one function, an implementation per backend, the same semantics on all of them.

Which keys a query may see is described by vectors, linear in the sequence length, never by a
``[batch, t, s]`` mask (:class:`Visibility`). Query ``i`` may attend to key ``j`` of a block when
the key is valid and either the block is ``always`` visible (prefix tuning's keys) or::

    pos[j] <= pos[i]  and  pos[i] - pos[j] < window  and  (seg[j] == seg[i]  or  seg[j] < 0)

``pos`` is a token's index in the stream (not its RoPE position: packed rows restart those), so
this is causal attention with an optional sliding window; a negative segment id marks prompt
tuning's virtual tokens, which every segment sees. Outputs at a query that may see no key, and at
padding (segment 0 of jft's batches, ``attention_mask`` 0), are unspecified but finite: nothing
downstream reads them.

Implementations (``impl``; :func:`resolve` picks one for ``"auto"``):

- ``"xla"``: all scores of a query block at once, ``[b, heads, t, s]`` float32, so memory grows
  with ``t * s``. The reference, and the fastest when ``t`` is small (decoding with a KV cache):
  every implementation uses it for calls with at most ``chunk`` queries.
- ``"chunked"``: flash attention in plain XLA: an online softmax over ``chunk``-sized blocks of
  keys for each block of queries, blocks that the mask hides entirely skipped, and a custom
  gradient that recomputes the scores from the saved log-sum-exp, so memory grows linearly with
  the length. Runs everywhere; the default off TPU and GPU.
- ``"splash"``: Pallas splash attention, JAX's TPU kernel (interpret mode elsewhere, for tests).
- ``"cudnn"``: cuDNN flash attention through :func:`jax.nn.dot_product_attention` (NVIDIA GPUs,
  bfloat16 or float16).

The two kernels serve the training call: one block of new tokens (no KV cache or prefix-tuning
keys), sequence lengths they tile, segments without virtual tokens. splash takes the segment ids
(padding becomes a segment of its own); cuDNN takes rows of one segment followed by padding,
checked on the device each step, and a batch with packed rows runs ``"chunked"`` instead
(``lax.cond``: one compiled step, exact either way). Every other call goes to ``"chunked"``, or
``"xla"`` when ``t <= chunk``. :func:`describe` says in words what a configuration runs.
(The kernels take short training rows too; only ``"chunked"`` hands rows of at most ``chunk``
tokens to whole-score attention, which is exact and cheap there.)
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

# A large finite negative instead of -inf: a query that may attend to nothing (a padding
# position) then gets a finite distribution instead of NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
_SPLASH_TILE = 128  # splash's blocks are multiples of 128 tokens


@flax.struct.dataclass
class Visibility:
    """Which keys of one block each query may see; ``None`` fields take their default.

    q_pos ``[t]`` / k_pos ``[s]``: stream index of each query / key (default ``arange``; the
    new tokens' block needs no offset, only differences matter). q_seg ``[b, t]`` / k_seg
    ``[b, s]``: segment ids (default: one segment). k_valid ``[b, s]`` bool (default: all).
    ``shared``: segments may hold negative ids, seen by every segment. ``always``: every valid
    key is seen by every query (no causality, window or segments).
    """

    q_pos: Array | None = None
    k_pos: Array | None = None
    q_seg: Array | None = None
    k_seg: Array | None = None
    k_valid: Array | None = None
    shared: bool = flax.struct.field(pytree_node=False, default=False)
    always: bool = flax.struct.field(pytree_node=False, default=False)


def resolve(impl: str, platform: str | None = None) -> str:
    """The implementation ``impl`` names on ``platform`` (default: JAX's default backend)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention={impl!r} is not one of {IMPLEMENTATIONS}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "chunked")
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this backend is {platform!r}); use 'auto'")
    return impl


def describe(impl: str, chunk: int, platform: str | None = None) -> str:
    """One line for the run log: what runs for training calls and for the others."""
    name = resolve(impl, platform)
    short = f"calls of <= {chunk} queries (short rows, decoding): whole scores"
    if name == "xla":
        return "xla (scores held whole; memory grows with length squared)"
    if name == "chunked":
        return f"chunked XLA flash attention ({chunk}-token blocks); {short}"
    rest = f"other calls: chunked XLA ({chunk}-token blocks), or whole scores at <= {chunk} queries"
    if name == "splash":
        interpret = " in interpret mode" if (platform or jax.default_backend()) != "tpu" else ""
        return f"Pallas splash attention{interpret} for lengths that are multiples of {_SPLASH_TILE}; {rest}"
    return f"cuDNN flash attention for rows of one segment (packed rows: chunked XLA); {rest}"


def attention(
    q_bthd: Array,
    blocks: list[tuple[Array, Array, Visibility]],
    window: Array | int,
    *,
    windows: tuple[int, ...] = (),
    impl: str = "auto",
    chunk: int = 512,
) -> Array:
    """Grouped-query attention of ``q`` over one or more key/value blocks.

    q: ``[batch, t, heads, head_dim]``; each block is ``(k, v, visibility)`` with k, v
    ``[batch, kv_heads, s, head_dim]``. The softmax runs over the keys of all blocks together
    (a KV cache and the new tokens are attended to without writing the new keys into the cache
    first). ``window``: this layer's sliding window (a huge value: none), traced under the layer
    scan; ``windows``: the values it can take (static; the kernels need one). Scores and softmax
    are float32. Returns ``[batch, t, heads * head_dim]``.
    """
    name = resolve(impl)
    t = q_bthd.shape[1]
    if name in ("splash", "cudnn"):
        kernel = _kernel_call(name, q_bthd, blocks, window, windows, chunk)
        if kernel is not None:
            return kernel
    if name == "xla" or t <= chunk:
        return _dense(q_bthd, blocks, window)
    return _chunked(q_bthd, blocks, window, chunk)


# ---------------------------------------------------------------------------- the mask, once


def _allowed(vis: Visibility, window, q_pos, k_pos, q_seg, k_seg, k_valid) -> Array:
    """``[b or 1, tq, tk]`` bool for the given (already sliced) vectors of one block."""
    if vis.always:
        m = jnp.ones((1, q_pos.shape[0], k_pos.shape[0]), bool)
    else:
        dist = q_pos[:, None] - k_pos[None, :]
        m = ((dist >= 0) & (dist < window))[None]
        if q_seg is not None:
            same = q_seg[:, :, None] == k_seg[:, None, :]
            m = m & (same | (k_seg < 0)[:, None, :] if vis.shared else same)
    if k_valid is not None:
        m = m & k_valid[:, None, :]
    return m


def _vectors(vis: Visibility, t: int, s: int):
    """The block's vectors with defaults filled in: q_pos, k_pos, q_seg, k_seg, k_valid."""
    q_pos = jnp.arange(t) if vis.q_pos is None else vis.q_pos
    k_pos = jnp.arange(s) if vis.k_pos is None else vis.k_pos
    return q_pos, k_pos, vis.q_seg, vis.k_seg, vis.k_valid


# ---------------------------------------------------------------------------- xla (dense)


def _group(q_bthd: Array, kv: int) -> Array:
    """``[b, t, h, d] -> [b, kv, g, t, d]``: the queries that share a key/value head together."""
    b, t, h, d = q_bthd.shape
    return q_bthd.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)


def _ungroup(out_bkgtd: Array) -> Array:
    b, kv, g, t, d = out_bkgtd.shape
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g * d)


def _dense(q_bthd, blocks, window):
    b, t, h, d = q_bthd.shape
    kv = blocks[0][0].shape[1]
    g = h // kv
    # Fold the query groups into the query axis: per (batch, kv head) one [g*t, d] x [d, s]
    # matmul, which XLA runs without transposing the (large) keys and values.
    q = _group(q_bthd, kv).reshape(b, kv, g * t, d)
    batch_dims = ((0, 1), (0, 1))
    scores = []
    for k, _, vis in blocks:
        s = jax.lax.dot_general(q, k, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32)
        s = s.reshape(b, kv, g, t, -1) * (d**-0.5)
        mask = _allowed(vis, window, *_vectors(vis, t, k.shape[2]))
        scores.append(jnp.where(mask[:, None, None], s, MASK_VALUE))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).reshape(b, kv, g * t, -1)
    out, start = 0.0, 0
    for k, v, _ in blocks:
        p = probs[..., start : start + k.shape[2]].astype(v.dtype)
        out = out + jax.lax.dot_general(p, v, (((3,), (2,)), batch_dims), preferred_element_type=jnp.float32)
        start += k.shape[2]
    return _ungroup(out.astype(q_bthd.dtype).reshape(b, kv, g, t, d))


# ---------------------------------------------------------------------------- chunked (flash, XLA)


def _chunked(q_bthd, blocks, window, chunk):
    """Concatenate the blocks' keys (in practice: prefix-tuning keys + the new tokens) with
    per-key vectors, pad both lengths to whole chunks, and run :func:`_flash`."""
    b, t, h, d = q_bthd.shape
    kv = blocks[0][0].shape[1]
    own = [vis for _, _, vis in blocks if not vis.always]
    main = own[0] if own else blocks[0][2]
    q_pos, _, q_seg, _, _ = _vectors(main, t, 0)
    any_seg = any(vis.k_seg is not None for vis in own)
    keys = {"k_pos": [], "k_seg": [], "k_valid": [], "always": []}
    for k, _, vis in blocks:
        s = k.shape[2]
        _, k_pos, _, k_seg, k_valid = _vectors(vis, t, s)
        keys["k_pos"].append(jnp.zeros(s, jnp.int32) if vis.always else k_pos.astype(jnp.int32))
        keys["k_seg"].append(jnp.zeros((b, s), jnp.int32) if k_seg is None else k_seg.astype(jnp.int32))
        keys["k_valid"].append(jnp.ones((b, s), bool) if k_valid is None else k_valid)
        keys["always"].append(jnp.full(s, vis.always))
    keys = {n: jnp.concatenate(parts, axis=-1) for n, parts in keys.items()}
    k = jnp.concatenate([blk[0] for blk in blocks], axis=2)
    v = jnp.concatenate([blk[1] for blk in blocks], axis=2)
    s = k.shape[2]
    tq, tk = _round_up(t, chunk), _round_up(s, chunk)
    meta = {
        "q_pos": _pad(q_pos.astype(jnp.int32), tq, 0),
        "q_seg": _pad(jnp.zeros((b, t), jnp.int32) if q_seg is None else q_seg.astype(jnp.int32), tq, 0),
        "k_pos": _pad(keys["k_pos"], tk, 0),
        "k_seg": _pad(keys["k_seg"], tk, 0),
        "k_valid": _pad(keys["k_valid"], tk, False),
        "always": _pad(keys["always"], tk, False),
    }
    q = _pad(_group(q_bthd, kv), tq, 0, axis=3)
    k, v = _pad(k, tk, 0, axis=2), _pad(v, tk, 0, axis=2)
    shared = any(vis.shared for vis in own) and any_seg
    flash = jax.checkpoint(_flash, static_argnums=(5, 6, 7), prevent_cse=False)
    out = flash(q, k, v, meta, jnp.asarray(window, jnp.int32), chunk, shared, any_seg)
    return _ungroup(out[:, :, :, :t])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad(x, n, value, axis=-1):
    extra = n - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block_mask(qi, kj, window, shared, with_seg):
    """``[b, c, c]`` for query chunk ``qi`` and key chunk ``kj`` (dicts of sliced vectors)."""
    vis = Visibility(shared=shared)
    q_seg, k_seg = (qi["q_seg"], kj["k_seg"]) if with_seg else (None, None)
    m = _allowed(vis, window, qi["q_pos"], kj["k_pos"], q_seg, k_seg, None)
    return (m | kj["always"][None, None, :]) & kj["k_valid"][:, None, :]


def _chunks(x, c, axis):
    """Split ``axis`` into chunks of ``c`` and move the chunk index to the front."""
    shape = x.shape[:axis] + (x.shape[axis] // c, c) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unchunk(x, axis):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2 :])


def _split_meta(meta, c):
    q = {n: _chunks(meta[n], c, meta[n].ndim - 1) for n in ("q_pos", "q_seg")}
    k = {n: _chunks(meta[n], c, meta[n].ndim - 1) for n in ("k_pos", "k_seg", "k_valid", "always")}
    return q, k


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, meta, window, c, shared, with_seg):
    """q ``[b, kv, g, tq, d]``, k/v ``[b, kv, tk, d]`` (lengths multiples of ``c``) -> out like q."""
    return _flash_fwd(q, k, v, meta, window, c, shared, with_seg)[0]


def _flash_fwd(q, k, v, meta, window, c, shared, with_seg):
    scale = q.shape[-1] ** -0.5
    q_meta, k_meta = _split_meta(meta, c)
    ks, vs = _chunks(k, c, 2), _chunks(v, c, 2)

    def one_query_chunk(xs):
        qi, qm = xs
        b, kv, g = qi.shape[:3]

        def step(carry, ys):
            kj, vj, km = ys
            mask = _block_mask(qm, km, window, shared, with_seg)[:, None, None]

            def update(carry):
                m, total, acc = carry
                s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
                s = jnp.where(mask, s, MASK_VALUE)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, alpha * total + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(mask.any(), update, lambda x: x, carry), None

        init = (
            jnp.full((b, kv, g, c), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kv, g, c), jnp.float32),
            jnp.zeros((b, kv, g, c, qi.shape[-1]), jnp.float32),
        )
        (m, total, acc), _ = jax.lax.scan(step, init, (ks, vs, k_meta))
        total = jnp.where(total > 0, total, 1.0)  # no block seen (all skipped): out 0
        return (acc / total[..., None]).astype(q.dtype), m + jnp.log(total)

    out, lse = jax.lax.map(one_query_chunk, (_chunks(q, c, 3), q_meta))
    out = _unchunk(out, 3)
    return out, (q, k, v, meta, window, out, lse)


def _flash_bwd(c, shared, with_seg, res, d_out):
    q, k, v, meta, window, out, lse = res
    scale = q.shape[-1] ** -0.5
    q_meta, k_meta = _split_meta(meta, c)
    ks, vs = _chunks(k, c, 2), _chunks(v, c, 2)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [b, kv, g, tq]

    def one_query_chunk(carry, xs):
        qi, doi, lsei, di, qm = xs

        def step(dqi, ys):
            kj, vj, km = ys
            mask = _block_mask(qm, km, window, shared, with_seg)[:, None, None]

            def grads(dqi):
                s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
                p = jnp.where(mask, jnp.exp(jnp.where(mask, s, MASK_VALUE) - lsei[..., None]), 0.0)
                dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - di[..., None]) * scale).astype(qi.dtype)
                dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                dk = jnp.einsum("bkgqs,bkgqd->bksd", ds, qi, preferred_element_type=jnp.float32)
                return dqi + dq, dk, dv

            def skip(dqi):
                zeros = jnp.zeros(kj.shape, jnp.float32)
                return dqi, zeros, zeros

            dqi, dk, dv = jax.lax.cond(mask.any(), grads, skip, dqi)
            return dqi, (dk, dv)

        dqi, (dk, dv) = jax.lax.scan(step, jnp.zeros(qi.shape, jnp.float32), (ks, vs, k_meta))
        dk_acc, dv_acc = carry
        return (dk_acc + dk, dv_acc + dv), dqi

    zeros = jnp.zeros(ks.shape, jnp.float32)
    xs = (_chunks(q, c, 3), _chunks(d_out, c, 3), lse, _chunks(delta, c, 3), q_meta)  # lse: [nq, b, kv, g, c]
    (dk, dv), dq = jax.lax.scan(one_query_chunk, (zeros, zeros), xs)
    dq = _unchunk(dq, 3).astype(q.dtype)
    dk, dv = _unchunk(dk, 2).astype(k.dtype), _unchunk(dv, 2).astype(v.dtype)
    return dq, dk, dv, jax.tree.map(lambda _: None, meta), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------- kernels


def _kernel_call(name, q_bthd, blocks, window, windows, chunk):
    """The kernel's output, or None where this call is not one the kernel takes."""
    if len(blocks) != 1:
        return None
    k, v, vis = blocks[0]
    b, t, h, d = q_bthd.shape
    if vis.always or vis.shared or vis.q_pos is not None or vis.k_pos is not None or k.shape[2] != t:
        return None
    if name == "splash" and t % _SPLASH_TILE:
        return None
    if name == "cudnn" and (q_bthd.dtype not in (jnp.bfloat16, jnp.float16) or d % 8 or d > 128):
        return None
    windows = tuple(sorted(set(windows))) or (window,)
    if len(windows) == 1:
        if not isinstance(windows[0], int):
            raise ValueError("attention kernels need the static windows the layers use (windows=...)")
        pick = lambda fn, *a: fn(windows[0], *a)
    else:
        index = jnp.searchsorted(jnp.asarray(windows), window)

        def pick(fn, *a):
            return jax.lax.switch(index, [functools.partial(fn, w) for w in windows], *a)

    seg = vis.q_seg
    if vis.k_valid is not None:  # padding becomes segment 0, as in jft's batches: seen by no real token
        seg = jnp.where(vis.k_valid, 1 if seg is None else seg, 0)
    if name == "splash":
        interpret = jax.default_backend() != "tpu"
        fn = lambda w, q, k, v, seg: _splash(q, k, v, seg, w, interpret)
        return _on_mesh(lambda q, k, v, seg: pick(fn, q, k, v, seg), q_bthd, k, v, seg, kv_heads=k.shape[1])
    fn = lambda w, q, k, v, seg: _cudnn_or_chunked(q, k, v, seg, w, chunk)
    return _on_mesh(lambda q, k, v, seg: pick(fn, q, k, v, seg), q_bthd, k, v, seg, kv_heads=k.shape[1])


def _on_mesh(fn, q, k, v, seg, kv_heads):
    """Run ``fn`` per device under the active mesh (a kernel is opaque to XLA's partitioner)."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or mesh.size == 1 or not rules:
        return fn(q, k, v, seg)
    P = jax.sharding.PartitionSpec
    batch, heads = nn.logical_to_mesh_axes(("batch", "heads"), rules)
    kv = nn.logical_to_mesh_axes(("kv_heads",), rules)[0]
    if heads != kv:
        raise ValueError(f"attention kernels need heads and kv_heads on the same mesh axes (got {heads}, {kv})")
    q_spec, kv_spec = P(batch, None, heads, None), P(batch, kv, None, None)
    seg_spec = P(batch, None)
    out_spec = P(batch, None, heads)
    if seg is None:
        specs, args = (q_spec, kv_spec, kv_spec), (q, k, v)
        body = lambda q, k, v: fn(q, k, v, None)
    else:
        specs, args, body = (q_spec, kv_spec, kv_spec, seg_spec), (q, k, v, seg), fn
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def _splash(q_bthd, k, v, seg, window, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q_bthd.shape
    kv = k.shape[1]
    g = h // kv
    shape = (t, t)
    one = sm.CausalMask(shape) if window >= t else sm.LocalMask(shape, (window - 1, 0), offset=0)
    block = math.gcd(t, 512)
    sizes = sk.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block, block_kv_dkv=block,
        block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * g), block_sizes=sizes, interpret=interpret)
    q = _group(q_bthd * jnp.asarray(d**-0.5, q_bthd.dtype), kv)  # [b, kv, g, t, d]; splash does not scale

    def per_head(qh, kh, vh, s):
        ids = None if s is None else sk.SegmentIds(q=s, kv=s)
        return kernel(qh, kh, vh, segment_ids=ids)

    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_row, in_axes=(0, 0, 0, None if seg is None else 0))(q, k, v, seg)
    return _ungroup(out.astype(q_bthd.dtype))


def _cudnn_or_chunked(q_bthd, k, v, seg, window, chunk):
    """cuDNN for rows of one segment then padding (checked on the device); chunked otherwise."""
    b, t, h, d = q_bthd.shape
    local = None if window >= t else (window - 1, 0)

    def cudnn(q, k, v, lengths):
        out = jax.nn.dot_product_attention(
            q,
            k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3),
            is_causal=True,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            local_window_size=local,
            implementation="cudnn",
        )
        return out.reshape(b, t, h * d)

    if seg is None:
        return cudnn(q_bthd, k, v, None)
    simple, lengths = one_segment_rows(seg)
    vis = Visibility(q_seg=seg, k_seg=seg)

    def chunked(q, k, v, _):
        return _chunked(q, [(k, v, vis)], window, chunk)

    return jax.lax.cond(simple, cudnn, chunked, q_bthd, k, v, lengths)


def one_segment_rows(seg: Array) -> tuple[Array, Array]:
    """``(all rows are one segment then padding, each row's length)`` for segment ids ``[b, t]``
    (0 = padding): when true, causal attention over each row's first ``length`` tokens is exact
    for every real token. An all-padding row gets length 1 (one finite query)."""
    real = seg != 0
    run = jnp.cumprod((seg == seg[:, :1]) & real, axis=1).astype(bool)  # [s, s, ..., s] at the start
    return jnp.all(run | ~real), jnp.maximum(run.sum(1), 1).astype(jnp.int32)
