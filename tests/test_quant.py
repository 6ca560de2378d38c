"""Blockwise 4-bit quantization: the published NF4 table and rule, ties, scaling, packing, bytes, errors.

The reference here is written from the published algorithm, independent of jft's constants: the NF4
values of the QLoRA paper / bitsandbytes, bitsandbytes' decision tree for the codes (thresholds and
comparison as in its ``dQuantizeNF4`` kernel), and for int4 and double quantization the rules that
jft.quant documents.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft import quant
from jft.quant import QuantizedWeight, dequantize, dequantize_t, quantize, quantized_bytes

# NormalFloat4 as published (QLoRA, Dettmers et al. 2023; bitsandbytes' NF4 dequantization table). The
# values are float32 numbers, written with 17 significant digits so that they round-trip exactly.
NF4_PUBLISHED = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)

# The 15 thresholds of bitsandbytes' dQuantizeNF4 decision tree (float literals in its CUDA and CPU
# kernels), ascending. The tree branches on `x > threshold`, so a value exactly on one gets the lower code.
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    np.float32,
)

# Symmetric int4 as jft.quant documents it: code c -> fl32((c - 8) / 7); thresholds the exact midpoints of
# those float32 levels, rounded to float32 (as NF4's are of its values).
INT4_LEVELS = ((np.arange(16) - 8.0) / 7.0).astype(np.float32)
INT4_THRESHOLDS = ((INT4_LEVELS[:-1].astype(np.float64) + INT4_LEVELS[1:]) / 2).astype(np.float32)

TABLES = {"nf4": NF4_PUBLISHED, "int4": INT4_LEVELS}
THRESHOLDS = {"nf4": NF4_THRESHOLDS, "int4": INT4_THRESHOLDS}


def tree_codes(y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Codes of normalised float32 values by the 4-level decision tree: each level tests one bit, `y > t`."""
    code = np.zeros(y.shape, np.int64)
    for bit in (8, 4, 2, 1):  # root: thresholds[7]; then [3] or [11]; ...
        code += bit * (y > thresholds[code + bit - 1])
    return code.astype(np.uint8)


def reference_codes(kernel: np.ndarray, kind: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 codes [out*in//2], float32 absmax [n_blocks]) of a kernel [in, out].

    Blocks run over the PyTorch [out, in] layout; y = x * fl32(1 / absmax) in float32 (bitsandbytes
    multiplies by the reciprocal); two codes per byte, the first in the high nibble.
    """
    blocks = np.asarray(kernel, np.float32).T.reshape(-1, block_size)
    absmax = np.abs(blocks).max(axis=1)
    inv = np.float32(1.0) / np.where(absmax == 0, np.float32(1.0), absmax)
    codes = tree_codes((blocks * inv[:, None]).ravel(), THRESHOLDS[kind])
    return (codes[0::2] << 4) | codes[1::2], absmax


def reference_dequantize(packed: np.ndarray, scales: np.ndarray, kind: str, block_size: int, shape) -> np.ndarray:
    """float32 [in, out]: table value * block scale."""
    values = TABLES[kind][unpack(packed)].reshape(-1, block_size) * np.asarray(scales, np.float32)[:, None]
    n_in, n_out = shape
    return values.reshape(n_out, n_in).T


def reference_double_quant(scales: np.ndarray, offset: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """jft's documented double quantization: (uint8 codes, float32 group absmax, float32 dequantized scales).

    The centred scales ``scales - offset`` are cut in groups of 256; per group ``round(c / absmax * 127)``
    is stored + 128; dequantized as ``(q - 128) * (absmax / 127) + offset``.
    """
    n = len(scales)
    centred = np.zeros(-(-n // 256) * 256, np.float32)
    centred[:n] = scales - offset
    groups = centred.reshape(-1, 256)
    absmax = np.abs(groups).max(axis=1)
    safe = np.where(absmax == 0, np.float32(1.0), absmax)
    q = (np.clip(np.round(groups / safe[:, None] * np.float32(127.0)), -127, 127) + 128).astype(np.uint8)
    q = q.ravel()[:n]
    step = np.repeat(absmax / np.float32(127.0), 256)[:n]
    return q, absmax, (q.astype(np.float32) - np.float32(128.0)) * step + offset


def unpack(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed)
    return np.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(*packed.shape[:-1], -1)


def test_tables_are_the_published_ones():
    assert quant.NF4_TABLE.dtype == np.float32 and quant.INT4_TABLE.dtype == np.float32
    np.testing.assert_array_equal(quant.NF4_TABLE, NF4_PUBLISHED)
    np.testing.assert_array_equal(quant.INT4_TABLE, INT4_LEVELS)
    # bitsandbytes' thresholds are the float32-rounded midpoints of the published values
    t = NF4_PUBLISHED.astype(np.float64)
    np.testing.assert_array_equal(((t[:-1] + t[1:]) / 2).astype(np.float32), NF4_THRESHOLDS)


def engineered_kernel(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A [in=128, out=48] float32 kernel with random blocks, values on and next to every threshold, zero blocks.

    Built in the [out, in] layout (two blocks of 64 per row) and returned transposed, with the indices
    of the table values and thresholds inside [-1, 1] (int4's code 0, -8/7, and the threshold above it
    are outside). Rows 0, 4, 5 (absmax 2.0, a power of two, so 1 / absmax is exact and y = x / 2
    exactly): 2 * the thresholds, the float32 just below them, just above them. Row 1 (absmax 1 from
    -1.0): the thresholds reversed, then the table values. Row 6 (absmax 3.0): per threshold a value near
    it on whose side of it x * fl32(1/3) and x / 3 disagree, where there is one. Row 2 and the second
    block of row 3: zeros.
    """
    table, thr = TABLES[kind], THRESHOLDS[kind]
    mid_idx = np.flatnonzero(np.abs(thr) <= 1)
    val_idx = np.flatnonzero(np.abs(table) <= 1)
    m, v = len(mid_idx), len(val_idx)
    wt = np.random.default_rng(seed).normal(0, 0.02, (48, 128)).astype(np.float32)
    for row, values in (
        (0, thr[mid_idx]),
        (4, np.nextafter(thr[mid_idx], np.float32(-np.inf))),
        (5, np.nextafter(thr[mid_idx], np.float32(np.inf))),
    ):
        wt[row, :64] = 0.01
        wt[row, 0] = 2.0
        wt[row, 1 : 1 + m] = 2.0 * values
    wt[1, :64] = 0.0
    wt[1, 0] = -1.0
    wt[1, 1 : 1 + m] = thr[mid_idx][::-1]
    wt[1, 16 : 16 + v] = table[val_idx]
    wt[6, :64] = 0.01
    wt[6, 0] = 3.0
    inv = np.float32(1.0) / np.float32(3.0)
    for j, t in enumerate(thr[mid_idx]):
        near = [np.float32(t * np.float32(3.0))]
        for direction in (np.inf, -np.inf):
            x = near[0]
            for _ in range(4):
                x = np.nextafter(x, np.float32(direction))
                near.append(x)
        disagree = [x for x in near if (x * inv > t) != (x / np.float32(3.0) > t)]
        wt[6, 1 + j] = disagree[0] if disagree else near[0]
    wt[2, :] = 0.0
    wt[3, 64:] = 0.0
    return wt.T.copy(), mid_idx, val_idx


@pytest.mark.parametrize("kind", ["nf4", "int4"])
def test_codes_match_reference_with_ties_and_zero_blocks(kind):
    kernel, mid_idx, val_idx = engineered_kernel(kind)
    q = quantize(kernel, kind=kind, block_size=64, double_quant=False)
    ref, absmax = reference_codes(kernel, kind, 64)
    np.testing.assert_array_equal(np.asarray(q.codes), ref)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax)

    codes = unpack(q.codes).reshape(48, 128)  # [out, in]
    m, v = len(mid_idx), len(val_idx)
    # threshold i separates codes i and i + 1: on it -> i (`>` in the tree), just below -> i, just above -> i + 1
    np.testing.assert_array_equal(codes[0, 1 : 1 + m], mid_idx)
    np.testing.assert_array_equal(codes[4, 1 : 1 + m], mid_idx)
    np.testing.assert_array_equal(codes[5, 1 : 1 + m], mid_idx + 1)
    np.testing.assert_array_equal(codes[1, 1 : 1 + m], mid_idx[::-1])
    np.testing.assert_array_equal(codes[1, 16 : 16 + v], val_idx)
    assert codes[0, 0] == 15 and codes[1, 0] == val_idx[0]
    # row 6 tells the reciprocal multiply from a division: the codes follow y = x * fl32(1 / absmax)
    row6 = kernel[1 : 1 + m, 6]
    by_division = tree_codes(row6 / np.float32(3.0), THRESHOLDS[kind])
    assert (by_division != codes[6, 1 : 1 + m]).sum() >= 2
    zero_code = {"nf4": 7, "int4": 8}[kind]
    assert TABLES[kind][zero_code] == 0
    assert (codes[2] == zero_code).all() and (codes[3, 64:] == zero_code).all()
    # int4 never produces code 0 (-8/7 lies outside [-1, 1])
    assert kind == "nf4" or (codes != 0).all()
    # dequantized: table value * absmax; zero blocks give exact zeros, +-absmax and the table values are exact
    w = np.asarray(dequantize(q, jnp.float32))
    np.testing.assert_array_equal(w, reference_dequantize(ref, absmax, kind, 64, kernel.shape))
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
    ref, absmax = reference_codes(kernel, kind, block_size)
    np.testing.assert_array_equal(np.asarray(q.codes), ref)
    np.testing.assert_array_equal(np.asarray(q.scales), absmax)
    # the tree gives the nearest table value wherever the two nearest are not (almost) tied
    y = (kernel.T.reshape(-1, block_size) / absmax[:, None]).astype(np.float64).ravel()
    dist = np.abs(y[:, None] - TABLES[kind].astype(np.float64)[None])
    two = np.sort(dist, axis=1)[:, :2]
    clear = two[:, 1] - two[:, 0] > 1e-6
    np.testing.assert_array_equal(unpack(q.codes)[clear], np.argmin(dist, axis=1)[clear])


def test_nibble_order_high_first():
    # one row whose first block holds the 16 table values in order: codes 0..15 -> bytes 0x01, 0x23, ...
    wt = np.zeros((2, 32), np.float32)
    wt[0, :16] = NF4_PUBLISHED
    q = quantize(wt.T, block_size=16, double_quant=False)
    assert np.asarray(q.codes)[:8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert q.codes.shape == (32,)


def test_round_trip_equals_reference_and_error_stats():
    w = np.random.default_rng(0).normal(0, 0.02, (512, 1408)).astype(np.float32)
    mean_abs = np.abs(w).mean()
    rel = {}
    for kind in ("nf4", "int4"):
        ref, absmax = reference_codes(w, kind, 64)
        for dq in (False, True):
            q = quantize(w, kind=kind, block_size=64, double_quant=dq)
            np.testing.assert_array_equal(np.asarray(q.codes), ref)
            scales = reference_double_quant(absmax, np.asarray(q.scale_offset))[2] if dq else absmax
            out = np.asarray(dequantize(q, jnp.float32))
            np.testing.assert_allclose(out, reference_dequantize(ref, scales, kind, 64, w.shape), rtol=1e-6, atol=0)
            err = out - w
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
    assert rel["nf4", False] < rel["int4", False]  # NF4 is made for normally distributed weights
    for kind in ("nf4", "int4"):
        assert rel[kind, True] < 1.01 * rel[kind, False]  # documented: double quant adds < 0.1%


@pytest.mark.parametrize("n_out", [72, 150])  # 144 blocks (one group of 256, padded); 300 blocks (two groups)
def test_double_quant_scales(n_out):
    w = np.random.default_rng(2).normal(0, 0.02, (128, n_out)).astype(np.float32)
    plain = quantize(w, double_quant=False)
    q = quantize(w)
    n_blocks = 128 * n_out // 64
    assert q.scales.dtype == jnp.uint8 and q.scales.shape == (n_blocks,)
    assert q.scale_scales.shape == (-(-n_blocks // 256),) and q.scale_offset.shape == ()
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
    absmax = np.asarray(plain.scales)
    offset = np.asarray(q.scale_offset)
    np.testing.assert_allclose(offset, absmax.astype(np.float64).mean(), rtol=1e-6)
    # given that offset (a float32 mean, whose rounding depends on the order of summation) the codes are
    # exact; XLA may round the fused centring differently by an ulp
    codes, group_absmax, scales = reference_double_quant(absmax, offset)
    np.testing.assert_array_equal(np.asarray(q.scales), codes)
    np.testing.assert_allclose(np.asarray(q.scale_scales), group_absmax, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(quant.block_scales(q)), scales, rtol=1e-6, atol=0)
    assert len(np.unique(codes)) > 50  # the codes use the int8 range, not a few levels
    # uniform levels: each scale within half a step of its float32 value
    step = np.repeat(group_absmax, 256)[:n_blocks] / 127
    assert (np.abs(scales - absmax) <= step / 2 * (1 + 1e-5) + 1e-9).all()


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
