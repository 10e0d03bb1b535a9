"""Every matmul kernel against a numpy reference, and every SIMD kernel against the scalar C reference,
on random and edge-case data (zeros, extremes, outliers, odd lengths, every row-block tail)."""
import numpy as np
import pytest

from pyqrt import _native
from pyqrt._native import lib

from convert.formats import f16 as f16_format
from convert.formats import q8 as q8_format

ISAS = ["scalar"] + [isa for isa in ("avx2",) if _native.isa_supported(isa)]


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
