"""Blockwise 4-bit quantization: codes against a numpy reference, ties, error, packing, bytes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import quant
from jft.quant import INT4_TABLE, NF4_TABLE, QuantizedWeight, dequantize, dequantize_t, quantize, quantized_bytes

TABLES = {"nf4": NF4_TABLE, "int4": INT4_TABLE}


def reference_codes(kernel: np.ndarray, table: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The published algorithm in plain numpy: (packed uint8 codes [out*in//2], float32 absmax [n_blocks]).

    Blocks run over the PyTorch [out, in] layout; y = x * (1 / absmax) in float32; the code is the
    number of float32 midpoints between consecutive table values that lie strictly below y.
    """
    blocks = np.asarray(kernel, np.float32).T.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    inv = np.float32(1.0) / np.where(absmax == 0, np.float32(1.0), absmax)
    y = blocks * inv[:, None]
    t = table.astype(np.float64)
    mids = ((t[:-1] + t[1:]) / 2).astype(np.float32)
    codes = np.searchsorted(mids, y.ravel(), side="left").astype(np.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def unpack(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(*packed.shape[:-1], -1)


def engineered_kernel(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [in=128, out=48] float32 kernel with random blocks, exact midpoint ties and zero blocks.

    Built in the [out, in] layout (two blocks of 64 per row) and returned transposed, with the indices
    of the table values and midpoints inside [-1, 1] (int4's code 0, -8/7, and the midpoint above it
    are outside). Row 0 (absmax 2.0, a power of two, so 1 / absmax is exact and y lands exactly on the
    midpoints): 2 * midpoints. Row 1 (absmax 1 from -1.0): the midpoints reversed, then the table
    values. Row 2 and the second block of row 3: zeros.
    """
    table = TABLES[kind].astype(np.float64)
    mids = ((table[:-1] + table[1:]) / 2).astype(np.float32)
    mid_idx = np.flatnonzero(np.abs(mids) <= 1)
    val_idx = np.flatnonzero(np.abs(table) <= 1)
    m, v = len(mid_idx), len(val_idx)
    wt = np.random.default_rng(seed).normal(0, 0.02, (48, 128)).astype(np.float32)
    wt[0, :64] = 0.01
    wt[0, 0] = 2.0
    wt[0, 1 : 1 + m] = 2.0 * mids[mid_idx]
    wt[1, :64] = 0.0
    wt[1, 0] = -1.0
    wt[1, 1 : 1 + m] = mids[mid_idx][::-1]
    wt[1, 16 : 16 + v] = table[val_idx].astype(np.float32)
    wt[2, :] = 0.0
    wt[3, 64:] = 0.0
    return wt.T.copy(), mid_idx, val_idx


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_codes_match_reference_with_ties_and_zero_blocks(kind):
    kernel, mid_idx, val_idx = engineered_kernel(kind)
    q = quantize(kernel, kind=kind, block_size=64, double_quant=False)
    ref, absmax = reference_codes(kernel, TABLES[kind], 64)
    np.testing.assert_array_equal(np.asarray(q.codes), ref)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax)

    codes = unpack(q.codes).reshape(48, 128)  # [out, in]
    m, v = len(mid_idx), len(val_idx)
    # a value exactly on the midpoint between codes i and i + 1 gets the lower code i
    np.testing.assert_array_equal(codes[0, 1 : 1 + m], mid_idx)
    np.testing.assert_array_equal(codes[1, 1 : 1 + m], mid_idx[::-1])
    np.testing.assert_array_equal(codes[1, 16 : 16 + v], val_idx)
    assert codes[0, 0] == 15 and codes[1, 0] == val_idx[0]
    zero_code = {"nf4": 7, "int4": 8}[kind]
    assert TABLES[kind][zero_code] == 0
    assert (codes[2] == zero_code).all() and (codes[3, 64:] == zero_code).all()
    # int4 never produces code 0 (-8/7 lies outside [-1, 1])
    assert kind == "nf4" or (codes != 0).all()
    # zero blocks dequantize to exact zeros; +-absmax and the table values (times absmax 1) are exact
    w = np.asarray(dequantize(q))
    assert (w[:, 2] == 0).all() and (w[64:, 3] == 0).all()
    assert w[0, 0] == 2.0 and w[0, 1] == -1.0
    np.testing.assert_array_equal(w[16 : 16 + v, 1], TABLES[kind][val_idx])


@pytest.mark.parametrize("kind", ["nf4", "int4"])
@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_codes_match_reference_random(kind, block_size):
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 0.02, (256, 96)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.01] *= 30.0  # outliers, so blocks differ in scale
    q = quantize(kernel, kind=kind, block_size=block_size, double_quant=False)
    ref, absmax = reference_codes(kernel, TABLES[kind], block_size)
    np.testing.assert_array_equal(np.asarray(q.codes), ref)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax)
    # the midpoint rule is the nearest table value wherever the two nearest are not (almost) tied
    y = (kernel.T.reshape(-1, block_size) / absmax[:, None]).astype(np.float64).ravel()
    dist = np.abs(y[:, None] - TABLES[kind].astype(np.float64)[None])
    two = np.sort(dist, axis=1)[:, :2]
    clear = two[:, 1] - two[:, 0] > 1e-6
    np.testing.assert_array_equal(unpack(q.codes)[clear], np.argmin(dist, axis=1)[clear])


def test_nibble_order_high_first():
    # one row whose first block holds the 16 table values in order: codes 0..15 -> bytes 0x01, 0x23, ...
    wt = np.zeros((2, 32), np.float32)
    wt[0, :16] = NF4_TABLE
    q = quantize(wt.T, block_size=16, double_quant=False)
    assert np.asarray(q.codes)[:8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert q.codes.shape == (32,)


def test_round_trip_error_stats():
    w = np.random.default_rng(0).normal(0, 0.02, (512, 1408)).astype(np.float32)
    mean_abs = np.abs(w).mean()
    rel = {}
    for kind in ("nf4", "int4"):
        for dq in (False, True):
            q = quantize(w, kind=kind, block_size=64, double_quant=dq)
            err = np.asarray(dequantize(q, jnp.float32)) - w
            rel[kind, dq] = float(np.abs(err).mean() / mean_abs)
            print(
                f"\n{kind} double_quant={dq!s:5}: MAE/mean|w| = {rel[kind, dq]:.5f}, "
                f"RMSE/std = {np.sqrt((err**2).mean()) / w.std():.5f}, max|err|/max|w| = "
                f"{np.abs(err).max() / np.abs(w).max():.5f}, bits/param = {8 * q.nbytes / w.size:.4f}",
                end="",
            )
    for kind in ("nf4", "int4"):
        print(f"\n{kind}: double quant raises the MAE by {100 * (rel[kind, True] / rel[kind, False] - 1):.4f}%", end="")
    print()
    assert rel["nf4", False] < 0.095 and rel["int4", False] < 0.12
    assert rel["nf4", False] < rel["int4", False]  # NF4 is made for normally distributed weights
    for kind in ("nf4", "int4"):
        assert rel[kind, True] < 1.01 * rel[kind, False]


@pytest.mark.parametrize("n_out", [72, 150])  # 144 blocks (one group of 256, padded); 300 blocks (two groups)
def test_double_quant_scales(n_out):
    w = np.random.default_rng(2).normal(0, 0.02, (128, n_out)).astype(np.float32)
    plain = quantize(w, double_quant=False)
    q = quantize(w)
    n_blocks = 128 * n_out // 64
    assert q.scales.dtype == jnp.uint8 and q.scales.shape == (n_blocks,)
    assert q.scale_scales.shape == (-(-n_blocks // 256),) and q.scale_offset.shape == ()
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
    np.testing.assert_allclose(np.asarray(q.scale_offset), np.asarray(plain.scales).mean(), rtol=1e-6)
    scales = np.asarray(quant.block_scales(q))
    step = np.repeat(np.asarray(q.scale_scales), 256)[:n_blocks] / 127
    assert (np.abs(scales - np.asarray(plain.scales)) <= step / 2 * (1 + 1e-5) + 1e-9).all()


def test_stacked_equals_per_layer_and_transposed():
    w = np.random.default_rng(3).normal(0, 0.02, (3, 128, 72)).astype(np.float32)
    q = quantize(w)
    assert q.codes.shape == (3, 128 * 72 // 2) and q.scale_offset.shape == (3,)
    assert q.full_shape == (3, 128, 72) and q.ndim == 3 and q.shape == (128, 72)
    stacked = np.asarray(dequantize(q))
    for i in range(3):
        qi = quantize(w[i])
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(qi), strict=True):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))
        np.testing.assert_array_equal(stacked[i], np.asarray(dequantize(qi)))
    np.testing.assert_array_equal(np.asarray(dequantize_t(q)), stacked.swapaxes(-1, -2))
    # scanning over the layers (as nn.scan does) slices every array of the weight along the layer axis
    _, per_layer = jax.lax.scan(lambda c, qi: (c, dequantize(qi)), 0, q)
    np.testing.assert_array_equal(np.asarray(per_layer), stacked)


def test_jit_bfloat16_and_output_dtype():
    w = jnp.asarray(np.random.default_rng(4).normal(0, 0.02, (2, 128, 64)), jnp.bfloat16)
    q = quantize(w)
    assert q.dtype == "bfloat16"
    jq = jax.jit(quantize, static_argnames=("kind", "block_size", "double_quant"))(w)
    assert isinstance(jq, QuantizedWeight) and jq.dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(jq), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # bf16 quantizes as its exact float32 upcast does
    q32 = quantize(w.astype(jnp.float32), double_quant=False)
    np.testing.assert_array_equal(np.asarray(quantize(w, double_quant=False).codes), np.asarray(q32.codes))

    out = jax.jit(dequantize)(q)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 128, 64)
    assert dequantize(q, jnp.float32).dtype == jnp.float32
    assert dequantize_t(q, "float32").shape == (2, 64, 128)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(q, jnp.float32).astype(jnp.bfloat16)))
    rel = (
        np.abs(np.asarray(out, np.float32) - np.asarray(w, np.float32)).mean()
        / np.abs(np.asarray(w, np.float32)).mean()
    )
    assert rel < 0.1
    # numpy float64 input
    q64 = quantize(np.asarray(w, np.float64), double_quant=False)
    np.testing.assert_array_equal(np.asarray(q64.codes), np.asarray(q32.codes))


def test_bytes_and_packing():
    w = np.random.default_rng(5).normal(0, 0.02, (512, 1408)).astype(np.float32)
    bf16_bytes = w.size * 2
    for kind in ("nf4", "int4"):
        q = quantize(w, kind=kind)
        assert q.codes.dtype == jnp.uint8 and q.codes.nbytes == w.size // 2
        assert q.scales.dtype == jnp.uint8 and q.scale_scales.dtype == jnp.float32
        arrays = (q.codes, q.scales, q.scale_scales, q.scale_offset)
        assert q.nbytes == sum(a.nbytes for a in arrays)
        assert q.nbytes <= 0.27 * bf16_bytes
    plain = quantize(w, double_quant=False)
    assert plain.scales.dtype == jnp.float32 and plain.scale_scales is None and plain.scale_offset is None
    assert plain.nbytes == w.size // 2 + w.size // 64 * 4
    bias = jnp.zeros((1408,), jnp.bfloat16)
    tree = {"layer": {"kernel": q, "bias": bias, "plain": plain}, "step": 3}
    assert quantized_bytes(tree) == q.nbytes + plain.nbytes + bias.nbytes
    abstract = jax.eval_shape(lambda t: t, tree["layer"])  # ShapeDtypeStruct leaves count too
    assert quantized_bytes(abstract) == quantized_bytes(tree["layer"])
    print(f"\nnf4 + double quant: {q.nbytes / bf16_bytes:.4f}x of bf16 ({8 * q.nbytes / w.size:.4f} bits/param)")


@pytest.mark.parametrize(
    "kernel, kwargs, match",
    [
        (np.zeros((64,), np.float32), {}, r"at least 2 dims.*\(64,\)"),
        (np.zeros((64, 8), np.int32), {}, r"floating-point kernel; got dtype int32 for shape \(64, 8\)"),
        (np.zeros((64, 8), np.float32), dict(kind="fp4"), r"unsupported quantization kind 'fp4'.*'nf4' or 'int4'"),
        (np.zeros((64, 8), np.float32), dict(block_size=0), r"positive even int; got 0"),
        (np.zeros((64, 8), np.float32), dict(block_size=-64), r"positive even int; got -64"),
        (np.zeros((64, 8), np.float32), dict(block_size=63), r"block_size must be even.*got 63"),
        (np.zeros((64, 8), np.float32), dict(block_size=64.0), r"positive even int; got 64.0"),
        (np.zeros((3, 5), np.float32), {}, r"shape \(3, 5\) has an odd number of elements"),
        (np.zeros((96, 5), np.float32), {}, r"block_size 64 does not divide the 480 values of kernel shape \(96, 5\)"),
        (np.zeros((2, 20, 6), np.float32), dict(block_size=16), r"does not divide the 120 values.*\(2, 20, 6\)"),
    ],
)
def test_bad_inputs(kernel, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(kernel, **kwargs)
