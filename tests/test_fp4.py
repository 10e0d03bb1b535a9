"""FP4 (LLM-FP4): the codebooks, the numpy twin of the C activation quantizer, the converter's search, and every
ISA's kernels against numpy on random and edge-case data (docs/QUANTIZATION.md)."""
import numpy as np
import pytest

from pyqrt import _native
from pyqrt._native import lib

from convert.formats import fp4
from tests.test_kernels import ISAS, make_acts, make_weight, quantize_acts_q8_group

TYPE = lib.QRZ_TYPE_FP4


def test_codebooks_are_the_float_formats():
    """each layout's magnitudes, in units of its smallest step, are what the float format 1.E.M encodes (the
    LLM-FP4 quantizer: exponent field p >= 1 gives (1 + f / 2^M) 2^(p - b), p = 0 the subnormals f / 2^M 2^(1 - b))"""
    for e in fp4.EXPONENTS:
        m = 3 - e
        want = sorted({f / 2**m * 2.0 ** (1 - 1) for f in range(2**m)} |
                      {(1 + f / 2**m) * 2.0 ** (p - 1) for p in range(1, 2**e) for f in range(2**m)})
        unit = 2.0 ** -m
        np.testing.assert_array_equal(fp4.codebook(e), np.array(want[:8]) / unit)
    np.testing.assert_array_equal(fp4.codebook(2) * 0.5, [0, 0.5, 1, 1.5, 2, 3, 4, 6])   # E2M1 with b = 1
    assert [fp4.max_act_shift(e) for e in (1, 2, 3)] == [1, 3, 0]
    for e in fp4.EXPONENTS:
        assert fp4.codebook(e)[-1] << fp4.max_act_shift(e) <= 127


@pytest.mark.parametrize("e", fp4.EXPONENTS)
def test_encode_is_nearest_with_ties_to_even(e):
    mags = fp4.codebook(e).astype(np.float64)
    rng = np.random.default_rng(e)
    v = np.concatenate([rng.uniform(-1.5, 1.5, 2000) * mags[-1], (mags[:-1] + mags[1:]) / 2,
                        -(mags[:-1] + mags[1:]) / 2, mags, -mags, [1e9, -1e9, 0.0, -0.0]]).astype(np.float32)
    codes = fp4.encode(v, e)
    assert codes.max() <= 15
    got = fp4.signed_lut(e)[codes].astype(np.float64)
    # nearest: no magnitude is strictly closer
    dist = np.abs(np.abs(v)[:, None] - mags[None, :])
    assert np.all(np.abs(np.abs(v) - np.abs(got)) <= dist.min(axis=1) + 1e-9)
    assert np.all((got == 0) | (np.sign(got) == np.sign(v)))
    assert not np.any(codes == 8)                          # -0 is code 0
    mids = ((mags[:-1] + mags[1:]) / 2).astype(np.float32)
    idx = fp4.encode(mids, e)
    assert np.all(idx % 2 == 0)                            # ties go to the even magnitude index


def _fp4_bytes(rng, rows, cols, group, e_w, e_a=2, mode=fp4.DYNAMIC, scale=1.0, shifts=None, codes=None, d=None):
    """FP4 bytes from chosen codes and scales: every code, offset and layout, not only what the search picks"""
    ng = cols // group
    codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8) if codes is None else codes
    d = rng.uniform(0.01, 2.0, (rows, ng)).astype(np.float16) if d is None else d
    if shifts is None:
        shifts = rng.integers(0, fp4.max_act_shift(e_a) + 1, cols).astype(np.uint8)
    return fp4.pack(e_w, d, codes, e_a, mode, scale, shifts)


def fp4_reference(wbytes, rows, cols, group, x, act_bits):
    """-> (exact result in float64, bound): x_d * sum_g d_w sum lut[code] q with the integer sums exact; the kernels
    round in float32 in their own order, so they are held to a relative bound on the sum of |terms|"""
    p = fp4.unpack(wbytes, rows, cols, group)
    ng = cols // group
    wl = fp4.signed_lut(p["e_w"])[p["codes"]].astype(np.int64).reshape(rows, ng, group)
    if act_bits == 8:
        q, d_x = quantize_acts_q8_group(x, group)
    else:
        q, d_x = fp4.quantize_acts(x, p["e_a"], p["mode"], p["scale"], p["shifts"], group)
    q = q.astype(np.int64).reshape(len(x), ng, group)
    # d_x per (row, group): a row scale is the same in every group
    d_x = np.broadcast_to(d_x.astype(np.float64).reshape(len(x), -1), (len(x), ng))[:, None, :]
    d_w = p["d16"].astype(np.float64)[None]
    sums = np.einsum("rgk,igk->irg", wl, q).astype(np.float64)
    want = (sums * d_w * d_x).sum(axis=2)
    mag = (np.einsum("rgk,igk->irg", np.abs(wl), np.abs(q)) * d_w * d_x).sum(axis=2)
    return want, 2e-6 * mag + 1e-30


CASES = [
    # group, weight rows, cols, activation rows
    (32, 7, 64, 1), (32, 33, 96, 5), (32, 3, 576, 65), (64, 5, 128, 3), (64, 65, 640, 7), (64, 1, 2048, 33),
    (96, 3, 192, 4), (128, 7, 384, 5), (256, 9, 512, 2), (320, 3, 640, 5), (640, 5, 640, 3), (2048, 3, 2048, 2),
    # sixteen rows and eight activation rows or more: the AVX-512 kernel's blocks (and its rows and groups left over)
    (32, 33, 160, 9), (64, 17, 640, 70), (96, 20, 192, 12), (256, 16, 512, 8),
    # one activation row against eight weight rows or more: the AVX2 decoding kernel that reads two runs per load
    # (groups of 32, 64 and 128; a partial block of eight groups; rows left over)
    (32, 17, 128, 1), (32, 8, 192, 1), (32, 16, 2048, 1), (64, 24, 640, 1), (128, 9, 384, 5), (64, 8, 4864, 1),
    # one activation row, groups of 64, sixteen weight rows or more: the AVX-512 decoding kernel (a whole block of
    # eight groups and two left over; two blocks of rows and five left over; Qwen2.5's MLP width)
    (64, 16, 640, 1), (64, 37, 1024, 1), (64, 48, 4864, 1),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("kind", ["random", "zeros", "extremes", "outlier", "tiny"])
@pytest.mark.parametrize("group,rows,cols,n", CASES)
def test_fp4_matmul_matches_numpy(isa, act_bits, kind, group, rows, cols, n):
    rng = np.random.default_rng(hash((isa, act_bits, kind, group, rows, cols, n)) % 2**32)
    w = make_weight(kind, rows, cols, rng)
    x = make_acts(kind, n, cols, rng)
    if kind == "random":   # random codes, layouts, offsets and modes: all of the format, not only the search's picks
        e_w, e_a = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        mode = int(rng.integers(0, 3))
        scale = float(np.abs(x).max() / 8) if mode == fp4.STATIC else 0.9
        wbytes = _fp4_bytes(rng, rows, cols, group, e_w, e_a, mode, scale)
    else:
        wbytes = fp4.quantize(w, group)
    got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
    assert got.shape == (n, rows) and np.all(np.isfinite(got))
    want, bound = fp4_reference(wbytes, rows, cols, group, x, act_bits)
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("mode", fp4.ACT_MODES)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("e_w", fp4.EXPONENTS)
@pytest.mark.parametrize("group,rows,cols,n", CASES)
def test_fp4_simd_matches_scalar(mode, act_bits, e_w, group, rows, cols, n):
    if len(ISAS) < 2:
        pytest.skip("this CPU has no SIMD path to compare")
    rng = np.random.default_rng(17 + e_w)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    scale = 0.3 if mode == fp4.STATIC else 0.8
    wbytes = _fp4_bytes(rng, rows, cols, group, e_w, 4 - e_w, mode, scale)
    ref = _native.kernel_matmul("scalar", TYPE, group, wbytes, rows, cols, x, act_bits)
    for isa in ISAS[1:]:
        got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
        # exact int32 group sums, then the same float multiply-adds in the same order: bit for bit
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("e_w", fp4.EXPONENTS)
@pytest.mark.parametrize("act_bits", [8, 4])
def test_fp4_largest_sums(isa, e_w, act_bits):
    """every weight the layout's top magnitude and every activation lane at its extreme: the integer sums reach
    their bounds (int16 pair sums in the SIMD kernels, int32 group sums) and must still be exact"""
    e_a = 2
    # the second: AVX-512's sixteen-row blocks; the third its decoding kernel
    for rows, cols, group, n in ((4, 4096, 4096, 3), (16, 512, 256, 8), (32, 512, 64, 1)):
        codes = np.full((rows, cols), 7, np.uint8)
        codes[1] = 15
        codes[2, ::2] = 15
        ng = cols // group
        wbytes = fp4.pack(e_w, np.ones((rows, ng), np.float16), codes, e_a, fp4.STATIC, 1.0, np.zeros(cols, np.uint8))
        x = np.full((n, cols), 1e6, np.float32)
        x[1:2] = -1e6   # (with one row, codes 15 give the negative extreme)
        got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
        want, bound = fp4_reference(wbytes, rows, cols, group, x, act_bits)
        assert np.all(np.abs(got - want) <= bound)
        top = int(fp4.codebook(e_w)[-1]) * (127 if act_bits == 8 else 12 << 3)
        assert abs(want[0, 0]) > 0.99 * top * cols * (1 if act_bits == 8 else 2.0 ** -3)


def test_fp4_act_twin_matches_the_c_quantizer():
    """the numpy twin gives the C lanes exactly: with weights that are 1 at a single column (E1M2 code 1, scale 1),
    the kernel's output is the activation's dequantized value there, column by column; every layout and mode"""
    rng = np.random.default_rng(5)
    cols, group = 256, 64
    x = np.concatenate([rng.standard_normal((3, cols)) * 3, rng.standard_normal((1, cols)) * 1e-30,
                        np.zeros((1, cols)), make_weight("extremes", 1, cols, rng),
                        np.round(rng.standard_normal((2, cols)) * 8) / 2]).astype(np.float32)   # exact ties
    codes = np.zeros((cols, cols), np.uint8)
    codes[np.arange(cols), np.arange(cols)] = 1
    for e_a in fp4.EXPONENTS:
        for mode, scale in ((fp4.DYNAMIC, 1.0), (fp4.DYNAMIC, 0.4), (fp4.STATIC, 0.5), (fp4.STATIC, 1e-3),
                            (fp4.GROUPED, 1.0), (fp4.GROUPED, 0.4)):
            shifts = rng.integers(0, fp4.max_act_shift(e_a) + 1, cols).astype(np.uint8)
            wbytes = fp4.pack(1, np.ones((cols, cols // group), np.float16), codes, e_a, mode, scale, shifts)
            got = _native.kernel_matmul("scalar", TYPE, group, wbytes, cols, cols, x, 4)
            lanes, d = fp4.quantize_acts(x, e_a, mode, scale, shifts, group)
            d = np.repeat(d.reshape(len(x), -1), cols // d.reshape(len(x), -1).shape[1], axis=1)
            np.testing.assert_array_equal(got, lanes.astype(np.float32) * d)


@pytest.mark.parametrize("group", [32, 64, 96])
def test_fp4_pack_round_trip_and_dequant_row(group):
    rng = np.random.default_rng(group)
    rows, cols = 5, 192
    for e_w in fp4.EXPONENTS:
        wbytes = _fp4_bytes(rng, rows, cols, group, e_w, e_a=2, mode=fp4.STATIC, scale=0.25)
        assert wbytes.nbytes == fp4.nbytes(rows, cols, group) == lib.qrz_tensor_nbytes(TYPE, rows, cols, group)
        p = fp4.unpack(wbytes, rows, cols, group)
        again = fp4.pack(p["e_w"], p["d16"], p["codes"], p["e_a"], p["mode"], p["scale"], p["shifts"])
        np.testing.assert_array_equal(again, wbytes)
        deq = fp4.dequantize(wbytes, rows, cols, group)
        for r in range(rows):
            np.testing.assert_array_equal(_native.kernel_dequant_row(TYPE, group, wbytes, rows, cols, r), deq[r])


def test_fp4_search_picks_a_layout_and_beats_absmax_int4():
    """the searched scales never lose to the plain absmax scale of the same layout, and on heavy-tailed weights
    (where a float grid pays) the chosen layout's error is below round-to-nearest INT4's at the same group"""
    from convert.formats import int4
    rng = np.random.default_rng(3)
    rows, cols, group = 64, 256, 64
    w = (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)
    e, d16, codes = fp4.search_weights(w, group)
    err = float(((fp4.dequantize_weights(d16, codes, group, e) - w) ** 2).sum())
    saved = fp4.SCALE_CANDIDATES
    try:
        fp4.SCALE_CANDIDATES = np.ones(1, np.float32)
        d1, c1 = fp4.quantize_weights(w, group, e)
    finally:
        fp4.SCALE_CANDIDATES = saved
    assert err <= float(((fp4.dequantize_weights(d1, c1, group, e) - w) ** 2).sum())
    int4_err = float(((int4.dequantize(int4.quantize(w, group), rows, cols, group) - w) ** 2).sum())
    assert err < int4_err


def test_fp4_activation_search_lowers_the_output_error():
    """with outlier input channels, the searched offsets / layout / scale give a smaller layer output error on
    held-out rows than dynamic E2M1 with no offsets and no clipping"""
    rng = np.random.default_rng(4)
    rows, cols, n = 48, 256, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    chan = np.exp(rng.standard_normal(cols) * 1.2).astype(np.float32)      # channel magnitudes over ~2 decades
    x = (rng.standard_normal((2 * n, cols)) * chan).astype(np.float32)
    fit, held = x[:n], x[n:]
    wbytes = fp4.quantize(w, 64, calib=fp4.Calibration(gram=fit.T @ fit / n, absmax=np.abs(fit).max(axis=0),
                                                         samples=fit[:fp4.SAMPLE_ROWS]))
    p = fp4.unpack(wbytes, rows, cols, 64)
    assert p["shifts"].max() > 0                       # some channels were raised
    y = held @ w.T
    tuned = _native.kernel_matmul("scalar", TYPE, 64, wbytes, rows, cols, held, 4)
    plain_bytes = fp4.pack(p["e_w"], p["d16"], p["codes"], 2, fp4.DYNAMIC, 1.0)
    plain = _native.kernel_matmul("scalar", TYPE, 64, plain_bytes, rows, cols, held, 4)
    assert ((tuned - y) ** 2).sum() < 0.8 * ((plain - y) ** 2).sum()


def test_fp4_search_takes_group_scales_for_token_outliers():
    """rows where, on some tokens, a few channels are hundreds of times larger than the rest (Qwen2.5's down_proj
    inputs): one scale per row crushes the other channels of those rows, so the search takes per-group scales,
    and held-out rows through the kernel show the smaller error"""
    rng = np.random.default_rng(9)
    rows, cols, n, group = 48, 512, 512, 64
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((2 * n, cols)).astype(np.float32)
    hot = rng.random(2 * n) < 0.3                                   # a third of the tokens
    x[hot, 7] *= 400.0
    x[hot, 300] *= -250.0
    fit, held = x[:n], x[n:]
    calib = fp4.Calibration(gram=fit.T @ fit / n, absmax=np.abs(fit).max(axis=0), samples=fit[:fp4.SAMPLE_ROWS])
    wbytes = fp4.quantize(w, group, calib=calib)
    p = fp4.unpack(wbytes, rows, cols, group)
    assert p["mode"] == fp4.GROUPED
    saved = fp4.ACT_MODES
    try:
        fp4.ACT_MODES = (fp4.DYNAMIC, fp4.STATIC)
        row_bytes = fp4.pack(p["e_w"], p["d16"], p["codes"], *fp4.search_acts(
            fp4.dequantize(wbytes, rows, cols, group), calib.absmax, calib.samples, group))
    finally:
        fp4.ACT_MODES = saved
    y = held @ fp4.dequantize(wbytes, rows, cols, group).T
    err = {name: float(((_native.kernel_matmul("scalar", TYPE, group, b, rows, cols, held, 4) - y) ** 2).sum())
           for name, b in (("group", wbytes), ("row", row_bytes))}
    assert err["group"] < 0.5 * err["row"], err


def test_fp4_bad_shapes_and_headers_rejected():
    x = np.zeros((1, 96), np.float32)
    for cols, group in ((96, 16), (96, 48), (48, 16), (96, 0)):
        with pytest.raises(ValueError):
            fp4.nbytes(4, cols, group)
        assert lib.qrz_tensor_nbytes(TYPE, 4, cols, group) == 0
    good = fp4.quantize(np.ones((4, 96), np.float32), 32)
    assert _native.kernel_matmul("scalar", TYPE, 32, good, 4, 96, x, 4).shape == (1, 4)
    bad = []
    for at, value in ((0, 0), (0, 4), (1, 0), (1, 9), (2, 3)):    # layouts, mode
        b = good.copy()
        b[at] = value
        bad.append(b)
    for scale in (0.0, -1.0, np.inf, np.nan):
        b = good.copy()
        b[4:8] = np.array([scale], "<f4").view(np.uint8)
        bad.append(b)
    b = good.copy()
    b[fp4.HEADER_BYTES + 7] = fp4.max_act_shift(2) + 1           # an offset E2M1 lanes cannot hold in int8
    bad.append(b)
    for b in bad:
        for act_bits in (8, 4):
            with pytest.raises(ValueError):
                _native.kernel_matmul("scalar", TYPE, 32, b, 4, 96, x, act_bits)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
def test_fp4_kernels_are_batch_invariant(isa, act_bits):
    rng = np.random.default_rng(12)
    rows, cols, n = 24, 384, 9
    x = rng.standard_normal((n, cols)).astype(np.float32)
    for e_w, mode in zip(fp4.EXPONENTS, fp4.ACT_MODES):
        wbytes = _fp4_bytes(rng, rows, cols, 64, e_w, e_w, mode, 0.5)
        whole = _native.kernel_matmul(isa, TYPE, 64, wbytes, rows, cols, x, act_bits)
        for i0, i1 in [(0, 1), (1, 3), (3, 7), (7, 9)]:
            np.testing.assert_array_equal(_native.kernel_matmul(isa, TYPE, 64, wbytes, rows, cols, x[i0:i1],
                                                                act_bits), whole[i0:i1])


def test_fp4_search_never_writes_a_header_the_loader_refuses():
    """calibration statistics with an infinite channel maximum (an overflowed activation) still give a tensor
    whose header the C side accepts: the static scale candidates that are not finite are skipped"""
    rng = np.random.default_rng(8)
    rows, cols = 8, 64
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((32, cols)).astype(np.float32)
    absmax = np.abs(x).max(axis=0)
    absmax[3] = np.inf
    wbytes = fp4.quantize(w, 32, calib=fp4.Calibration(gram=x.T @ x / 32, absmax=absmax, samples=x))
    assert np.isfinite(fp4.unpack(wbytes, rows, cols, 32)["scale"])
    assert _native.kernel_matmul("scalar", TYPE, 32, wbytes, rows, cols, x, 4).shape == (32, rows)
