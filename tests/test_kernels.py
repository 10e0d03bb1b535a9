"""Every matmul kernel against a numpy reference, and every SIMD kernel against the scalar C reference,
on random and edge-case data (zeros, extremes, outliers, odd lengths, every row-block tail)."""
import numpy as np
import pytest

from pyqrt import _native
from pyqrt._native import lib

from convert.formats import f16 as f16_format
from convert.formats import int4 as int4_format
from convert.formats import nibbles
from convert.formats import q8 as q8_format
from convert.formats import sdr as sdr_format

ISAS = ["scalar"] + [isa for isa in ("avx2", "avxvnni", "avx512") if _native.isa_supported(isa)]


def quantize_acts_q8(x, group):
    """numpy twin of qrz_quantize_acts_q8: absmax per group to int8, round half to even"""
    rows, cols = x.shape
    g = x.reshape(rows, cols // group, group).astype(np.float32)
    d = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.rint(g * inv[:, :, None]).astype(np.float32)
    return (q * d[:, :, None]).reshape(rows, cols)


def make_weight(kind, rows, cols, rng):
    if kind == "random":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if kind == "zeros":
        return np.zeros((rows, cols), np.float32)
    if kind == "extremes":   # large but finite in f16, mixed signs, with exact zeros between
        w = rng.choice(np.array([-6.0e4, -1.0, 0.0, 1.0, 6.0e4], np.float32), size=(rows, cols))
        return w.astype(np.float32)
    if kind == "outlier":    # one huge value per row: the rest of its group quantizes to (near) zero
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.01
        w[np.arange(rows), rng.integers(0, cols, rows)] = 100.0
        return w
    if kind == "tiny":       # values in the f16 subnormal range
        return (rng.standard_normal((rows, cols)) * 1e-6).astype(np.float32)
    raise ValueError(kind)


def encode(type_name, w, group):
    if type_name == "f32":
        return np.ascontiguousarray(w, np.float32).view(np.uint8).ravel(), w
    if type_name == "f16":
        return f16_format.quantize(w), w.astype(np.float16).astype(np.float32)
    return q8_format.quantize(w, group), q8_format.dequantize(q8_format.quantize(w, group), w.shape[0], w.shape[1], group)


TYPE_IDS = {"f32": lib.QRZ_TYPE_F32, "f16": lib.QRZ_TYPE_F16, "q8": lib.QRZ_TYPE_Q8}

CASES = [
    # type, group, rows, cols, n activation rows
    ("f32", 0, 7, 37, 1), ("f32", 0, 33, 96, 5), ("f32", 0, 16, 576, 8), ("f32", 0, 1, 3, 2),
    ("f16", 0, 7, 37, 1), ("f16", 0, 33, 96, 5), ("f16", 0, 9, 576, 4),
    ("q8", 32, 7, 64, 1), ("q8", 32, 33, 96, 5), ("q8", 64, 16, 576, 7), ("q8", 128, 3, 256, 4),
    ("q8", 16, 5, 48, 3), ("q8", 48, 4, 96, 6), ("q8", 576, 2, 576, 1),
    # the AVX-512 kernel's sixteen scales at a time, groups of 32 two to a vector: a last group alone, fewer than
    # sixteen groups left, a single group
    ("q8", 32, 5, 896, 1), ("q8", 32, 9, 1056, 6), ("q8", 64, 3, 1088, 2), ("q8", 32, 4, 32, 3),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["random", "zeros", "extremes", "outlier", "tiny"])
@pytest.mark.parametrize("type_name,group,rows,cols,n", CASES)
def test_matmul_matches_numpy(isa, kind, type_name, group, rows, cols, n):
    rng = np.random.default_rng(hash((kind, type_name, group, rows, cols, n)) % 2**32)
    w = make_weight(kind, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if kind == "zeros":
        x[0] = 0.0   # an all-zero activation row has a zero scale: must give exact zeros, not NaN
    wbytes, w_deq = encode(type_name, w, group)
    x_ref = quantize_acts_q8(x, group) if type_name == "q8" else x
    want = x_ref.astype(np.float64) @ w_deq.astype(np.float64).T
    got = _native.kernel_matmul(isa, TYPE_IDS[type_name], group, wbytes, rows, cols, x)
    assert got.shape == (n, rows) and np.all(np.isfinite(got))
    # the only freedom left to the kernel is the float summation order
    bound = 1e-5 * (np.abs(x_ref).astype(np.float64) @ np.abs(w_deq).astype(np.float64).T) + 1e-30
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("type_name,group,rows,cols,n", CASES)
def test_simd_matches_scalar(type_name, group, rows, cols, n):
    if len(ISAS) < 2:
        pytest.skip("this CPU has no SIMD path to compare")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    wbytes, _ = encode(type_name, w, group)
    ref = _native.kernel_matmul("scalar", TYPE_IDS[type_name], group, wbytes, rows, cols, x)
    for isa in ISAS[1:]:
        got = _native.kernel_matmul(isa, TYPE_IDS[type_name], group, wbytes, rows, cols, x)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("isa", ISAS)
def test_q8_scales_read_past_the_plane_stay_out_of_the_sum(isa):
    """The AVX-512 kernel loads sixteen f16 scales at a time unmasked (a masked load does not train the hardware
    prefetcher), so the last row's load runs past its plane into the codes that follow, here codes -1 (bytes
    0xFF 0xFF, an f16 NaN) right after a plane of 32 rows x 3 groups (192 bytes, no padding); with an odd number
    of groups the last pair of groups picks that lane, which must come out as zero, not NaN."""
    rows, cols, group = 32, 96, 32
    rng = np.random.default_rng(11)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, :8] = -np.abs(w[0]).max() / 127   # codes -1 at the start of the codes
    wbytes, w_deq = encode("q8", w, group)
    assert rows * (cols // group) * 2 % 64 == 0 and bytes(wbytes[192:194]) == b"\xff\xff"
    x = rng.standard_normal((1, cols)).astype(np.float32)
    x_ref = quantize_acts_q8(x, group)
    got = _native.kernel_matmul(isa, lib.QRZ_TYPE_Q8, group, wbytes, rows, cols, x)
    want = x_ref.astype(np.float64) @ w_deq.astype(np.float64).T
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("type_name,group", [("f32", 0), ("f16", 0), ("q8", 32), ("q8", 16)])
def test_dequant_row_matches_numpy(type_name, group):
    rng = np.random.default_rng(3)
    w = make_weight("random", 5, 64, rng)
    w[1] = make_weight("tiny", 1, 64, rng)[0]
    w[2] = 0.0
    wbytes, w_deq = encode(type_name, w, group)
    for r in range(5):
        got = _native.kernel_dequant_row(TYPE_IDS[type_name], group, wbytes, 5, 64, r)
        np.testing.assert_array_equal(got, w_deq[r])


def test_f16_conversion_is_exact_on_every_half():
    """the scalar half->float conversion against numpy on all 65536 bit patterns (NaNs compared as NaN)"""
    halves = np.arange(65536, dtype=np.uint16).reshape(1024, 64)
    got = np.stack([_native.kernel_dequant_row(lib.QRZ_TYPE_F16, 0, halves.tobytes(), 1024, 64, r) for r in range(1024)])
    want = halves.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_array_equal(got[ok], want[ok])


def test_bad_kernel_arguments_raise():
    w = np.zeros(64 * 2, np.uint8)
    with pytest.raises(ValueError):   # 64 is not a multiple of group 48
        _native.kernel_matmul("scalar", lib.QRZ_TYPE_Q8, 48, w, 1, 64, np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError):   # buffer of the wrong size
        _native.kernel_matmul("scalar", lib.QRZ_TYPE_F32, 0, w[:10], 1, 64, np.zeros((1, 64), np.float32))


def test_native_module_is_the_one_under_test():
    """tests/sanitize.sh runs this file against a sanitized build: make sure that build is what got imported"""
    import os
    import pyqrt._qrz
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(pyqrt._qrz.__file__)) == os.path.join(root, "pyqrt")


# ---- 4-bit formats (SDR, INT4) and the activation forms their kernels take (docs/QUANTIZATION.md) ----
# The numpy twins below repeat the C quantizers' float32 arithmetic step for step (d = absmax / qmax in float32,
# inv = 1 / d in float32, x * inv in float32, round half to even), so they give the same codes, not just close ones.

def _f32(v):
    return np.float32(v)


def _inverse(d):
    """1.0f / d where d > 0, else 0 (a zero scale gives all-zero codes)"""
    return np.where(d > 0, _f32(1) / np.where(d > 0, d, _f32(1)), _f32(0)).astype(np.float32)


def quantize_acts_q8_group(x, group):
    """Q8_GROUP -> (q int32 (n, cols), d float32 (n, cols // group))"""
    n, cols = x.shape
    g = np.ascontiguousarray(x, np.float32).reshape(n, cols // group, group)
    d = (np.abs(g).max(axis=2) / _f32(127)).astype(np.float32)
    q = np.clip(np.rint(g * _inverse(d)[:, :, None]), -127, 127)
    return q.astype(np.int32).reshape(n, cols), d


def quantize_acts_q4_group(x, group):
    """Q4_GROUP -> (q int32 in -8..7 (n, cols), d float32 (n, cols // group)): d = absmax / 7"""
    n, cols = x.shape
    g = np.ascontiguousarray(x, np.float32).reshape(n, cols // group, group)
    d = (np.abs(g).max(axis=2) / _f32(7)).astype(np.float32)
    q = np.clip(np.rint(g * _inverse(d)[:, :, None]), -8, 7)
    return q.astype(np.int32).reshape(n, cols), d


def quantize_acts_i8_row(x):
    """I8_ROW -> (q int32 (n, cols), d float32 (n,)): one absmax / 127 scale per row"""
    x = np.ascontiguousarray(x, np.float32)
    d = (np.abs(x).max(axis=1) / _f32(127)).astype(np.float32)
    return np.rint(x * _inverse(d)[:, None]).astype(np.int32), d


def leading_one(v):
    """position of the leading one of non-negative integers, 0 for 0 (and 1)"""
    v = np.asarray(v, np.int64)
    return np.where(v > 0, np.frexp(np.maximum(v, 1).astype(np.float64))[1] - 1, 0)


def quantize_acts_sdr4_row(x, group):
    """SDR4_ROW -> (m int32 in -8..7 (n, cols), d float32 (n,), e int32 (n, cols // group)): an int16 base
    b = clip(rint(x / s), +-32767) with s = absmax / 32767, then per group e = max(0, lead(max |b|) - 2) and
    m = clip(rint(b / 2^e), -8, 7)"""
    x = np.ascontiguousarray(x, np.float32)
    n, cols = x.shape
    d = (np.abs(x).max(axis=1) / _f32(32767)).astype(np.float32)
    b = np.clip(np.rint(x * _inverse(d)[:, None]), -32767, 32767).astype(np.int64).reshape(n, cols // group, group)
    e = np.maximum(0, leading_one(np.abs(b).max(axis=2)) - 2)
    m = np.clip(np.rint(b / (2.0 ** e)[:, :, None]), -8, 7)   # exact: b and 2^e are small integers
    return m.astype(np.int32).reshape(n, cols), d, e.astype(np.int32)


def sdr_reference(wbytes, rows, cols, group, x, act_bits):
    """the SDR kernels' result, exactly: the integer sum in int64, then (float)total * (s_w * s_x) in float32"""
    s, e_w, m_w = sdr_format.unpack(wbytes, rows, cols, group)
    ng = cols // group
    m_w = m_w.astype(np.int64).reshape(rows, ng, group)
    e_w = e_w.astype(np.int64)
    if act_bits == 8:
        q, d = quantize_acts_i8_row(x)
        sums = np.einsum("rgk,igk->irg", m_w, q.astype(np.int64).reshape(len(x), ng, group))
        total = (sums << e_w[None, :, :]).sum(axis=2)
    else:
        q, d, e_x = quantize_acts_sdr4_row(x, group)
        sums = np.einsum("rgk,igk->irg", m_w, q.astype(np.int64).reshape(len(x), ng, group))
        total = (sums << (e_w[None, :, :] + e_x[:, None, :])).sum(axis=2)
    return total.astype(np.float32) * (s[None, :] * d[:, None]).astype(np.float32)


def int4_reference(wbytes, rows, cols, group, x, act_bits):
    """-> (exact result in float64, bound): sum_g d_w d_x sum m_w q with the integer sums exact; the kernels round
    in float32, in their own order, so they are held to the Q8 kernels' bound"""
    ng = cols // group
    d_w = wbytes[:rows * ng * 2].view("<f2").astype(np.float64).reshape(rows, ng)
    m_w = nibbles.unpack(wbytes[sdr_format.align64(rows * ng * 2):], rows, cols).astype(np.int64).reshape(rows, ng, group)
    q, d_x = (quantize_acts_q8_group if act_bits == 8 else quantize_acts_q4_group)(x, group)
    q = q.astype(np.int64).reshape(len(x), ng, group)
    sums = np.einsum("rgk,igk->irg", m_w, q).astype(np.float64)
    scale = d_w[None, :, :] * d_x.astype(np.float64)[:, None, :]
    want = (sums * scale).sum(axis=2)
    bound = 1e-5 * (np.einsum("rgk,igk->irg", np.abs(m_w), np.abs(q)).astype(np.float64) * np.abs(scale)).sum(axis=2)
    return want, bound + 1e-30


def make_acts(kind, n, cols, rng):
    """activations of the same kind as the weights, except that the first row stays random (and for "zeros" one
    row is random, so both a zero scale and an ordinary one meet every weight row)"""
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if kind != "random" and n > 1:
        x[1:] = make_weight(kind, n - 1, cols, rng)
    elif kind == "zeros":
        x[:] = 0.0
    return x


FORMAT_4BIT = {"sdr": (sdr_format, lib.QRZ_TYPE_SDR), "int4": (int4_format, lib.QRZ_TYPE_INT4)}

CASES_4BIT = [
    # type, group, weight rows, cols, activation rows
    ("sdr", 16, 7, 64, 1), ("sdr", 16, 33, 96, 5), ("sdr", 16, 3, 128, 65),
    ("sdr", 32, 5, 64, 3), ("sdr", 32, 65, 160, 7), ("sdr", 32, 1, 2048, 33),
    ("sdr", 64, 3, 256, 33), ("sdr", 64, 1, 576, 65),
    ("sdr", 256, 7, 512, 5), ("sdr", 256, 33, 768, 1), ("sdr", 256, 5, 256, 3),
    ("sdr", 48, 5, 96, 3), ("sdr", 96, 3, 192, 7), ("sdr", 128, 7, 384, 5), ("sdr", 80, 3, 160, 1),
    # sixteen rows and eight activation rows or more: the AVX-512 kernel's blocks (and the rows left over)
    ("sdr", 32, 33, 160, 9), ("sdr", 64, 17, 640, 70), ("sdr", 128, 16, 384, 8), ("sdr", 16, 20, 512, 12),
    # SDR's column kernel at groups that end inside a run, and columns past whole spans of 256
    ("sdr", 48, 16, 480, 9), ("sdr", 80, 17, 800, 8), ("sdr", 16, 32, 1056, 16),
    # one activation row (decoding): whole fours and pairs of runs, and the runs left after them, at each group
    # size the decoding kernels specialize (16, 32, 64, 128 and up)
    ("sdr", 16, 5, 96, 1), ("sdr", 16, 9, 896, 1), ("sdr", 16, 3, 2080, 1), ("sdr", 32, 7, 896, 1),
    ("sdr", 32, 5, 160, 1), ("sdr", 64, 5, 448, 1), ("sdr", 64, 3, 512, 1), ("sdr", 128, 3, 1152, 1),
    ("sdr", 256, 2, 1280, 1),
    ("int4", 16, 7, 64, 1), ("int4", 16, 33, 96, 5), ("int4", 32, 5, 64, 3), ("int4", 32, 65, 160, 7),
    ("int4", 32, 3, 576, 65), ("int4", 64, 3, 256, 33), ("int4", 256, 7, 512, 5), ("int4", 256, 1, 768, 1),
    ("int4", 48, 5, 96, 3), ("int4", 96, 3, 192, 7), ("int4", 512, 5, 1024, 3), ("int4", 320, 3, 640, 5),
]


def _matmul_4bit_case(isa, kind, type_name, group, rows, cols, n, act_bits):
    rng = np.random.default_rng(hash((kind, type_name, group, rows, cols, n, act_bits)) % 2**32)
    fmt, type_id = FORMAT_4BIT[type_name]
    w = make_weight(kind, rows, cols, rng)
    x = make_acts(kind, n, cols, rng)
    wbytes = fmt.quantize(w, group)
    got = _native.kernel_matmul(isa, type_id, group, wbytes, rows, cols, x, act_bits)
    assert got.shape == (n, rows) and np.all(np.isfinite(got))
    return wbytes, x, got


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("kind", ["random", "zeros", "extremes", "outlier", "tiny"])
@pytest.mark.parametrize("type_name,group,rows,cols,n", CASES_4BIT)
def test_4bit_matmul_matches_numpy(isa, act_bits, kind, type_name, group, rows, cols, n):
    wbytes, x, got = _matmul_4bit_case(isa, kind, type_name, group, rows, cols, n, act_bits)
    if type_name == "sdr":
        # The integer sum is exact in every implementation and the final (float)total * (s_w * s_x) is the same two
        # float32 roundings in the same order, so the result is bit for bit the numpy one: no ulp of slack.
        np.testing.assert_array_equal(got, sdr_reference(wbytes, rows, cols, group, x, act_bits))
    else:
        want, bound = int4_reference(wbytes, rows, cols, group, x, act_bits)
        assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("type_name,group,rows,cols,n", CASES_4BIT)
def test_4bit_simd_matches_scalar(act_bits, type_name, group, rows, cols, n):
    if len(ISAS) < 2:
        pytest.skip("this CPU has no SIMD path to compare")
    fmt, type_id = FORMAT_4BIT[type_name]
    rng = np.random.default_rng(11)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    wbytes = fmt.quantize(w, group)
    ref = _native.kernel_matmul("scalar", type_id, group, wbytes, rows, cols, x, act_bits)
    for isa in ISAS[1:]:
        got = _native.kernel_matmul(isa, type_id, group, wbytes, rows, cols, x, act_bits)
        if type_name == "sdr":
            np.testing.assert_array_equal(got, ref)   # the same integer total, the same float expression
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _sdr_bytes(rng, rows, cols, group, m=None, e=None):
    """SDR bytes from chosen codes: every mantissa and every shift the format allows, not only what the
    converter's search happens to produce"""
    ng = cols // group
    s = rng.uniform(0.5, 2.0, rows).astype(np.float32)
    m = rng.integers(-8, 8, (rows, cols)) if m is None else m
    e = rng.integers(0, 5, (rows, ng)) if e is None else e
    return sdr_format.pack(s, np.asarray(e, np.uint8), np.asarray(m, np.int8), group)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [16, 32, 48, 64, 128, 256])
def test_sdr_every_code_and_shift(isa, group):
    rng = np.random.default_rng(group)
    rows, cols, n = 9, 1536, 6
    wbytes = _sdr_bytes(rng, rows, cols, group)
    x = rng.standard_normal((n, cols)).astype(np.float32) * rng.uniform(0.01, 100, (n, 1)).astype(np.float32)
    for act_bits in (8, 4):
        got = _native.kernel_matmul(isa, lib.QRZ_TYPE_SDR, group, wbytes, rows, cols, x, act_bits)
        np.testing.assert_array_equal(got, sdr_reference(wbytes, rows, cols, group, x, act_bits))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [16, 32, 256])
def test_sdr_largest_sums(isa, group):
    """every weight -8 * 2^4 and every activation at its most negative code: W4A8 sums reach 2^17 * 16256 (the int32
    limit the format's column bound is set by), W4A4 products 2^22 each, so a row of 2048 sums past 2^32 and only
    the int64 total holds it; a partial sum in int16, or an int32 total, would wrap"""
    rng = np.random.default_rng(5)
    for cols, act_bits, rows, n in ((1 << 17, 8, 3, 5), (2048, 4, 3, 5), (4096, 4, 3, 5), (1 << 17, 8, 16, 8)):
        m = np.full((rows, cols), -8)
        e = np.full((rows, cols // group), 4)
        m[1, ::2] = 7       # a row of mixed signs and shifts
        e[1, ::3] = 0
        wbytes = _sdr_bytes(rng, rows, cols, group, m, e)
        x = np.full((n, cols), -1.0, np.float32)
        x[1] = 1.0
        x[2, ::2] = 0.25
        got = _native.kernel_matmul(isa, lib.QRZ_TYPE_SDR, group, wbytes, rows, cols, x, act_bits)
        want = sdr_reference(wbytes, rows, cols, group, x, act_bits)
        np.testing.assert_array_equal(got, want)
        s_w = sdr_format.unpack(wbytes, rows, cols, group)[0]
        s_x = quantize_acts_i8_row(x)[1] if act_bits == 8 else quantize_acts_sdr4_row(x, group)[1]
        total = float(want[0, 0]) / (float(s_w[0]) * float(s_x[0]))
        assert abs(total) > 0.99 * (16256 * cols if act_bits == 8 else (1 << 22) * cols)   # they did get that large


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [16, 32, 64, 256])
@pytest.mark.parametrize("cols", [16384, 16384 - 64])
def test_sdr_decoding_largest_sums(isa, group, cols):
    """one activation row (the AVX-512 decoding kernel, up to 16384 columns) at the largest magnitudes: weights
    -8 * 2^4, activations at their most negative code, and a row of mixed signs; 16384 - 64 columns end in two
    runs past the last whole four. The kernel takes 8 (q_a + q_b) off each int16 pair sum in its loop, so this is
    where a pair sum or the correction would wrap"""
    if cols % group:
        pytest.skip("the group does not divide the columns")
    rng = np.random.default_rng(6)
    rows = 18
    m = np.full((rows, cols), -8)
    e = np.full((rows, cols // group), 4)
    m[1, ::2] = 7
    e[1, ::3] = 0
    m[2] = rng.integers(-8, 8, cols)
    e[2] = rng.integers(0, 5, cols // group)
    wbytes = _sdr_bytes(rng, rows, cols, group, m, e)
    for x in (np.full((1, cols), -1.0, np.float32), np.full((1, cols), 1.0, np.float32),
              rng.standard_normal((1, cols)).astype(np.float32)):
        got = _native.kernel_matmul(isa, lib.QRZ_TYPE_SDR, group, wbytes, rows, cols, x, 8)
        np.testing.assert_array_equal(got, sdr_reference(wbytes, rows, cols, group, x, 8))


def test_acts_twins_match_the_c_quantizers():
    """the numpy twins give the C codes: with SDR weights that are 1 at a single column, the exact kernel output
    is s_w * s_x * (the activation's code there, shifted), column by column"""
    rng = np.random.default_rng(9)
    cols, group = 256, 32
    x = np.concatenate([rng.standard_normal((3, cols)), rng.standard_normal((1, cols)) * 1e-30,
                        np.zeros((1, cols)), make_weight("extremes", 1, cols, rng)]).astype(np.float32)
    m = np.zeros((cols, cols), np.int64)
    m[np.arange(cols), np.arange(cols)] = 1
    wbytes = sdr_format.pack(np.ones(cols, np.float32), np.zeros((cols, cols // group), np.uint8), m.astype(np.int8), group)
    got8 = _native.kernel_matmul("scalar", lib.QRZ_TYPE_SDR, group, wbytes, cols, cols, x, 8)
    q, d = quantize_acts_i8_row(x)
    np.testing.assert_array_equal(got8, q.astype(np.float32) * d[:, None])
    got4 = _native.kernel_matmul("scalar", lib.QRZ_TYPE_SDR, group, wbytes, cols, cols, x, 4)
    q, d, e = quantize_acts_sdr4_row(x, group)
    np.testing.assert_array_equal(got4, (q << np.repeat(e, group, axis=1)).astype(np.float32) * d[:, None])
    assert e.max() == 12 and e.min() == 0


@pytest.mark.parametrize("type_name,group", [("sdr", 16), ("sdr", 32), ("sdr", 256), ("int4", 16), ("int4", 64),
                                             ("int4", 48)])
def test_4bit_dequant_row_matches_numpy(type_name, group):
    fmt, type_id = FORMAT_4BIT[type_name]
    rng = np.random.default_rng(4)
    rows, cols = 6, 768
    w = make_weight("random", rows, cols, rng)
    w[1] = make_weight("tiny", 1, cols, rng)[0]
    w[2] = 0.0
    w[3] = make_weight("outlier", 1, cols, rng)[0]
    w[4] = make_weight("extremes", 1, cols, rng)[0]
    wbytes = fmt.quantize(w, group)
    want = fmt.dequantize(wbytes, rows, cols, group)
    for r in range(rows):
        np.testing.assert_array_equal(_native.kernel_dequant_row(type_id, group, wbytes, rows, cols, r), want[r])
    if type_name == "sdr":
        codes = _sdr_bytes(rng, rows, cols, group)
        want = sdr_format.dequantize(codes, rows, cols, group)
        for r in range(rows):
            np.testing.assert_array_equal(_native.kernel_dequant_row(type_id, group, codes, rows, cols, r), want[r])


def test_nibble_plane_round_trip_and_layout():
    rng = np.random.default_rng(1)
    m = rng.integers(-8, 8, (5, 96)).astype(np.int8)
    packed = nibbles.pack(m)
    assert packed.shape == (5, 48) and packed.dtype == np.uint8
    np.testing.assert_array_equal(nibbles.unpack(packed, 5, 96), m)
    # byte j of a run: value j in the low nibble, value j + 16 in the high one, both stored as m + 8
    assert int(packed[2, 16 + 3]) == (int(m[2, 32 + 3]) + 8) | (int(m[2, 32 + 16 + 3]) + 8) << 4


@pytest.mark.parametrize("group", [16, 32, 48, 256])
def test_sdr_pack_unpack_round_trip(group):
    rng = np.random.default_rng(group)
    rows, cols = 7, 768
    ng = cols // group
    s = rng.standard_normal(rows).astype(np.float32)
    e = rng.integers(0, 16, (rows, ng)).astype(np.uint8)   # the nibble holds 0..15; the converter writes 0..4
    m = rng.integers(-8, 8, (rows, cols)).astype(np.int8)
    buf = sdr_format.pack(s, e, m, group)
    assert buf.nbytes == sdr_format.nbytes(rows, cols, group) == lib.qrz_tensor_nbytes(lib.QRZ_TYPE_SDR, rows, cols, group)
    s2, e2, m2 = sdr_format.unpack(buf, rows, cols, group)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(e2, e)
    np.testing.assert_array_equal(m2, m)
    np.testing.assert_array_equal(sdr_format.dequantize(buf, rows, cols, group),
                                  s[:, None] * (m.astype(np.float32) * np.repeat(2.0 ** e, group, axis=1)).astype(np.float32))


@pytest.mark.parametrize("group", [16, 32, 256])
def test_sdr_quantize_round_trip(group):
    """the converter's output decodes to its own parts, and without the search its codes are QRazor's window on
    the int8 base: e = max(0, lead(max |b|) - 2), m = clip(rint(b / 2^e), -8, 7)"""
    rng = np.random.default_rng(2)
    rows, cols = 9, 512
    w = make_weight("random", rows, cols, rng)
    w[3] = make_weight("outlier", 1, cols, rng)[0]
    w[4] = 0.0
    for search in (False, True):
        s, e, m = sdr_format.quantize_parts(w, group, search)
        buf = sdr_format.pack(s, e, m, group)
        np.testing.assert_array_equal(buf, sdr_format.quantize(w, group, search))
        s2, e2, m2 = sdr_format.unpack(buf, rows, cols, group)
        np.testing.assert_array_equal(m2, m)
        np.testing.assert_array_equal(e2, e)
        assert e.max() <= 4 and np.abs(m).max() <= 8
        if not search:   # QRazor's rule: e = max(0, lead(max |b|) - 2) of the int8 base
            safe = np.where(s > 0, s, 1).astype(np.float32)
            b = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int64).reshape(rows, -1, group)
            np.testing.assert_array_equal(e, np.maximum(0, leading_one(np.abs(b).max(axis=2)) - 2))
            want_m = np.clip(np.rint(b / (2.0 ** e)[:, :, None]), -8, 7).reshape(rows, cols)
            np.testing.assert_array_equal(m, want_m)


@pytest.mark.parametrize("group", [16, 32, 48, 256])
def test_int4_quantize_round_trip(group):
    """the layout (f16 scales, then the nibble plane), the round-to-nearest error bound (where the f16 scale is
    a normal number: the tiny row's are subnormal and coarser), and idempotence on the decoded weights when no
    group uses -8 (and its scale is normal)"""
    rng = np.random.default_rng(3)
    rows, cols = 7, 768
    ng = cols // group
    w = make_weight("random", rows, cols, rng)
    w[2] = 0.0
    w[5] = make_weight("tiny", 1, cols, rng)[0]
    buf = int4_format.quantize(w, group)
    assert buf.nbytes == int4_format.nbytes(rows, cols, group) == lib.qrz_tensor_nbytes(lib.QRZ_TYPE_INT4, rows, cols, group)
    d = buf[:rows * ng * 2].view("<f2").astype(np.float32).reshape(rows, ng)
    m = nibbles.unpack(buf[int4_format.align64(rows * ng * 2):], rows, cols)
    deq = int4_format.dequantize(buf, rows, cols, group)
    np.testing.assert_array_equal(deq, (m.astype(np.float32).reshape(rows, ng, group) * d[:, :, None]).reshape(rows, cols))
    np.testing.assert_array_equal(d, (np.abs(w.reshape(rows, ng, group)).max(axis=2) / np.float32(7)).astype(np.float16).astype(np.float32))
    err = np.abs(deq - w).reshape(rows, ng, group)
    normal = d >= np.finfo(np.float16).tiny
    assert normal[0].all() and not normal[5].any()
    assert np.all((err <= d[:, :, None] * 0.5001)[normal])
    assert np.all(err[5] <= np.abs(w[5]).max())
    assert np.all(m[2] == 0) and np.all(d[2] == 0)
    no_minus8 = ~np.any(m.reshape(rows, ng, group) == -8, axis=2) & normal
    again = int4_format.quantize(deq, group)
    d2 = again[:rows * ng * 2].view("<f2").astype(np.float32).reshape(rows, ng)
    m2 = nibbles.unpack(again[int4_format.align64(rows * ng * 2):], rows, cols).reshape(rows, ng, group)
    np.testing.assert_array_equal(d2[no_minus8], d[no_minus8])
    np.testing.assert_array_equal(m2[no_minus8], m.reshape(rows, ng, group)[no_minus8])


@pytest.mark.parametrize("type_name", ["sdr", "int4"])
def test_4bit_bad_shapes_rejected(type_name):
    fmt, type_id = FORMAT_4BIT[type_name]
    x = np.zeros((1, 96), np.float32)
    for cols, group in ((48, 16), (96, 24), (96, 0), (96, 8), (80, 40)):
        with pytest.raises(ValueError):      # cols not a multiple of 32, or group not a multiple of 16
            fmt.nbytes(4, cols, group)
        assert lib.qrz_tensor_nbytes(type_id, 4, cols, group) == 0
        with pytest.raises(ValueError):
            _native.kernel_matmul("scalar", type_id, group, np.zeros(64, np.uint8), 4, cols, x[:, :cols])
    with pytest.raises(ValueError):          # a group that does not divide cols
        fmt.nbytes(4, 96, 64)
    assert lib.qrz_tensor_nbytes(type_id, 4, 96, 64) == 0
    if type_name == "sdr":                   # the shift plane and the int32 W4A8 sum set these limits
        assert lib.qrz_tensor_nbytes(type_id, 4, 512, 512) == 0
        assert lib.qrz_tensor_nbytes(type_id, 1, 1 << 18, 32) == 0
        with pytest.raises(ValueError):
            fmt.nbytes(1, 1 << 18, 32)
    wbytes = fmt.quantize(np.ones((4, 96), np.float32), 32)
    for act_bits in (0, 2, 16):
        with pytest.raises(ValueError):
            _native.kernel_matmul("scalar", type_id, 32, wbytes, 4, 96, x, act_bits)
    with pytest.raises(ValueError):          # a buffer of the wrong size
        _native.kernel_matmul("scalar", type_id, 32, wbytes[:-1], 4, 96, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("type_name,group", [("q8", 32), ("q8", 64), ("sdr", 16), ("sdr", 32), ("sdr", 96),
                                             ("int4", 16), ("int4", 32), ("int4", 64), ("int4", 96)])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_integer_kernels_are_batch_invariant(isa, type_name, group, act_bits):
    """a row's result must not depend on how many activation rows share the call: scoring a prompt in one pass
    and token by token then agree bit for bit (quantized activations turn a last-bit difference into a flipped
    code, which a deep model amplifies)"""
    from convert.formats import FORMATS
    rng = np.random.default_rng(11)
    rows, cols, n = 24, 96 * 4, 9
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    wbytes = FORMATS[type_name].quantize(w, group)
    tid = getattr(lib, f"QRZ_TYPE_{type_name.upper()}")
    whole = _native.kernel_matmul(isa, tid, group, wbytes, rows, cols, x, act_bits)
    for i0, i1 in [(0, 1), (1, 3), (3, 7), (7, 9)]:
        part = _native.kernel_matmul(isa, tid, group, wbytes, rows, cols, x[i0:i1], act_bits)
        np.testing.assert_array_equal(part, whole[i0:i1])
