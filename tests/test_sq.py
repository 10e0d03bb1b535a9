"""SQ-format (convert/formats/sq.py, type 6): the packing, the importance-chosen slots, the hot activation
channels, and the scalar and SIMD kernels against numpy on random and edge-case data."""
import numpy as np
import pytest

from convert.formats import sq
from pyqrt import _native
from pyqrt._native import lib
from tests.test_kernels import ISAS, make_acts, make_weight, quantize_acts_q8_group

TYPE = lib.QRZ_TYPE_SQ


def _sq_bytes(rng, rows, cols, group, k, n_hot=0, d=None, clip=1.0, grid=None):
    """SQ bytes from random stored codes, slots (positions anywhere in the group, duplicates included, any high
    part), hot channels and cold activation grid (random when None): all of the format, not only what the
    converter writes"""
    ng = cols // group
    d = rng.uniform(0.01, 2.0, (rows, ng)).astype(np.float16) if d is None else d
    codes = rng.integers(-8, 8, (rows, ng, group))
    pos = rng.integers(0, group, (rows, ng, k)).astype(np.uint8)
    high = rng.integers(-8, 8, (rows, ng, k))
    hot = np.zeros(cols, np.uint8)
    hot[rng.choice(cols, n_hot, replace=False)] = 1
    return sq.pack_stored(d, codes, high, pos, hot, clip, int(rng.integers(0, 2)) if grid is None else grid)


def sq_reference(wbytes, rows, cols, group, x, act_bits):
    """-> (exact result in float64, bound): sum_g d_w d_x (sum q x + sum_slots v x[pos]) with exact integer sums;
    the kernels round in float32 in their own order, so they are held to a relative bound on the sum of |terms|"""
    p = sq.unpack(wbytes, rows, cols, group)
    ng = cols // group
    if act_bits == 8:
        xq, xd = quantize_acts_q8_group(x, group)
    else:
        xq, xd = sq.quantize_acts(x, p["hot"], group, p["clip"], p["grid"])
    u = p["q"].astype(np.int64).reshape(rows, ng, group).copy()
    r_idx, g_idx = np.meshgrid(np.arange(rows), np.arange(ng), indexing="ij")
    for s in range(p["k"]):
        np.add.at(u, (r_idx, g_idx, p["pos"][:, :, s].astype(np.int64)), p["vals"][:, :, s].astype(np.int64))
    xq = xq.astype(np.int64).reshape(len(x), ng, group)
    sums = np.einsum("rgk,igk->irg", u, xq).astype(np.float64)
    scale = p["d16"].astype(np.float64)[None] * xd.astype(np.float64)[:, None, :]
    mag = (np.einsum("rgk,igk->irg", np.abs(u), np.abs(xq)) * np.abs(scale)).sum(axis=2)
    return (sums * scale).sum(axis=2), 2e-6 * mag + 1e-30


CASES = [
    # group, slots per group, weight rows, cols, activation rows
    (32, 1, 7, 64, 1), (32, 2, 33, 96, 5), (32, 0, 3, 576, 65), (64, 2, 5, 128, 3), (64, 1, 65, 640, 7),
    (64, 4, 1, 2048, 33), (96, 3, 3, 192, 4), (128, 4, 7, 384, 5), (256, 8, 9, 512, 2), (64, 64, 3, 128, 4),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("kind", ["random", "zeros", "extremes", "outlier", "tiny"])
@pytest.mark.parametrize("group,k,rows,cols,n", CASES)
def test_sq_matmul_matches_numpy(isa, act_bits, kind, group, k, rows, cols, n):
    rng = np.random.default_rng(hash((isa, act_bits, kind, group, k, rows, cols, n)) % 2**32)
    x = make_acts(kind, n, cols, rng)
    if kind == "random":
        wbytes = _sq_bytes(rng, rows, cols, group, k, n_hot=int(rng.integers(0, cols // 8 + 1)),
                           clip=float(rng.choice([1.0, 0.9, 0.7])))
    else:   # the converter's output for the kind, with hot channels and clipping searched on the activations
        w = make_weight(kind, rows, cols, rng)
        calib = sq.Calibration(gram=np.eye(cols, dtype=np.float32), absmax=np.abs(x).max(axis=0), samples=x)
        wbytes = sq.quantize(w, group, calib=calib, sparse=k / group)
    got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
    assert got.shape == (n, rows) and np.all(np.isfinite(got))
    want, bound = sq_reference(wbytes, rows, cols, group, x, act_bits)
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) / bound))


@pytest.mark.parametrize("act_bits", [8, 4])
@pytest.mark.parametrize("group,k,rows,cols,n", CASES)
def test_sq_simd_matches_scalar(act_bits, group, k, rows, cols, n):
    """the SIMD kernels' integer group sums are exact; only the order of the float multiply-adds differs"""
    if len(ISAS) < 2:
        pytest.skip("this CPU has no SIMD path to compare")
    rng = np.random.default_rng(23 + k)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    wbytes = _sq_bytes(rng, rows, cols, group, k, n_hot=cols // 16)
    ref = _native.kernel_matmul("scalar", TYPE, group, wbytes, rows, cols, x, act_bits)
    _, bound = sq_reference(wbytes, rows, cols, group, x, act_bits)
    for isa in ISAS[1:]:
        got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
        assert np.all(np.abs(got - ref) <= 2 * bound)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
def test_sq_largest_sums(isa, act_bits):
    """every dense code -8, every slot at SLOT_MIN or SLOT_MAX on hot channels at their extreme: the int16 pair
    sums of the SIMD kernels and the int32 group sums reach their bounds and stay exact"""
    rows, cols, group, k = 3, 2048, 256, 16
    ng = cols // group
    pos = np.tile(np.arange(0, group, group // k, dtype=np.uint8), (rows, ng, 1))
    q = np.full((rows, ng, group), -8, np.int8)
    np.put_along_axis(q, pos.astype(np.int64), 0, axis=2)
    q = q.reshape(rows, cols)
    vals = np.full((rows, ng, k), sq.SLOT_MIN, np.int16)
    vals[1] = sq.SLOT_MAX
    hot = np.zeros(cols, np.uint8)
    hot[(np.arange(ng)[:, None] * group + pos[0, 0][None, :]).reshape(-1)] = 1
    wbytes = sq.pack(np.ones((rows, ng), np.float16), q, pos, vals, hot)
    x = np.full((2, cols), -1e6, np.float32)
    x[1, ::2] = 1e6
    got = _native.kernel_matmul(isa, TYPE, group, wbytes, rows, cols, x, act_bits)
    want, bound = sq_reference(wbytes, rows, cols, group, x, act_bits)
    assert np.all(np.abs(got - want) <= bound)


# every group's largest cold value is 12, so with clip 1 the step is 1 and the others sit on E2M1's midpoints
E2M1_TIE_ROW = np.array([12, .5, 1.5, 2.5, 3.5, 5, 7, 10, -.5, -1.5, -2.5, -3.5, -5, -7, -10, -12], np.float32)


def test_sq_cold_activations_are_e2m1():
    """cold channels take the 4-bit E2M1 values (0, 0.5, 1, 1.5, 2, 3, 4, 6 times 2d, so integers in half steps),
    a midpoint going to the larger magnitude; hot channels stay int8 in the same step"""
    q, d = sq.quantize_acts(E2M1_TIE_ROW[None, :], np.zeros(16, np.uint8), 16, grid=sq.COLD_E2M1)
    assert d[0, 0] == 1.0
    np.testing.assert_array_equal(q[0], [12, 1, 2, 3, 4, 6, 8, 12, -1, -2, -3, -4, -6, -8, -12, -12])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 128)).astype(np.float32) * np.exp(rng.standard_normal(128)).astype(np.float32)
    hot = (rng.random(128) < 0.1).astype(np.uint8)
    q, d = sq.quantize_acts(x, hot, 64, clip=0.9, grid=sq.COLD_E2M1)
    cold = q[:, hot == 0]
    assert set(np.unique(np.abs(cold))) <= {0, 1, 2, 3, 4, 6, 8, 12} and 12 in np.abs(cold)
    assert np.abs(q[:, hot == 1]).max() <= 127
    assert sq.quantize_acts(x, hot, 64, clip=0.9)[0][:, hot == 0].max() <= 7    # the int4 grid is the default
    err = np.abs(sq.dequantize_acts(x, hot, 64, 0.9, sq.COLD_E2M1) - x)
    step = np.repeat(d, 64, axis=1)
    # a cold value within the clipped range is off by at most half the E2M1 gap around it (4 half steps near 12)
    inside = (np.abs(x) <= 12 * step) & (hot[None, :] == 0)
    assert np.all(err[inside] <= 2 * step[inside] * (1 + 1e-6))


def test_sq_act_twin_matches_the_c_quantizer():
    """the numpy twin gives the C codes exactly: with weights that are 1 at a single column (code 1, scale 1, no
    slots), the kernel's output is the activation's dequantized value there, column by column"""
    rng = np.random.default_rng(5)
    cols, group = 256, 64
    x = np.concatenate([rng.standard_normal((3, cols)) * 3, rng.standard_normal((1, cols)) * 1e-30,
                        np.zeros((1, cols)), make_weight("extremes", 1, cols, rng),
                        np.round(rng.standard_normal((2, cols)) * 8) / 2,                        # exact ties
                        np.tile(E2M1_TIE_ROW, cols // 16)[None, :]]).astype(np.float32)
    x[0, 5] = 400.0                                                                          # a hot outlier
    q = np.zeros((cols, cols), np.int8)
    q[np.arange(cols), np.arange(cols)] = 1
    empty = np.zeros((cols, cols // group, 0), np.uint8)
    for n_hot, clip in ((0, 1.0), (3, 1.0), (3, 0.8), (40, 0.9), (cols, 0.5), (0, 0.7)):
        hot = np.zeros(cols, np.uint8)
        hot[rng.choice(cols, n_hot, replace=False)] = 1
        hot[5] = 1 if n_hot else 0
        for grid in (sq.COLD_INT4, sq.COLD_E2M1):
            wbytes = sq.pack(np.ones((cols, cols // group), np.float16), q, empty, empty.view(np.int8), hot, clip,
                             grid)
            got = _native.kernel_matmul("scalar", TYPE, group, wbytes, cols, cols, x, 4)
            np.testing.assert_array_equal(got, sq.dequantize_acts(x, hot, group, clip, grid))


def test_sq_pack_round_trip_and_dequant_row():
    rng = np.random.default_rng(6)
    for group, k in ((32, 1), (64, 2), (64, 4), (96, 0), (96, 3), (256, 5)):
        rows, cols = 5, 2 * max(group, 96)
        cols -= cols % group
        wbytes = _sq_bytes(rng, rows, cols, group, k, n_hot=3, clip=0.85)
        assert wbytes.nbytes == sq.nbytes(rows, cols, group, k) == lib.qrz_tensor_nbytes_of(
            TYPE, rows, cols, group, _native.ffi.from_buffer(wbytes))
        assert lib.qrz_tensor_nbytes(TYPE, rows, cols, group) == 0          # the size is in the header
        p = sq.unpack(wbytes, rows, cols, group)
        again = sq.pack_stored(p["d16"], p["codes"], p["high"], p["pos"], p["hot"], p["clip"], p["grid"])
        np.testing.assert_array_equal(again, wbytes)
        want = sq.dequantize(wbytes, rows, cols, group)
        for r in range(rows):
            np.testing.assert_array_equal(_native.kernel_dequant_row(TYPE, group, wbytes, rows, cols, r), want[r])
        # what the converter writes (one slot per position, q = 0 there) round-trips through its parts too
        w = rng.standard_t(3, (rows, cols)).astype(np.float32)
        wbytes = sq.quantize(w, group, sparse=k / group)
        p = sq.unpack(wbytes, rows, cols, group)
        np.testing.assert_array_equal(sq.pack(p["d16"], p["q"], p["pos"], p["vals"], p["hot"], p["clip"], p["grid"]),
                                      wbytes)
        np.testing.assert_array_equal(sq.dequantize_parts(*sq.quantize_parts(w, group, k), group),
                                      sq.dequantize(wbytes, rows, cols, group))


def test_sq_slot_values_outside_the_stored_range_are_refused():
    """a slot's value is its nibble plus 16 times a 4-bit high part: SLOT_MIN..SLOT_MAX and no further"""
    rows, cols, group = 1, 64, 64
    q = np.zeros((rows, cols), np.int8)
    pos = np.zeros((rows, 1, 1), np.uint8)
    for v, ok in ((sq.SLOT_MIN, True), (sq.SLOT_MAX, True), (sq.SLOT_MIN - 1, False), (sq.SLOT_MAX + 1, False)):
        vals = np.full((rows, 1, 1), v, np.int16)
        if ok:
            p = sq.unpack(sq.pack(np.ones((rows, 1), np.float16), q, pos, vals), rows, cols, group)
            assert p["vals"][0, 0, 0] == v and p["q"].max() == 0 and p["q"].min() == 0
        else:
            with pytest.raises(ValueError):
                sq.pack(np.ones((rows, 1), np.float16), q, pos, vals)


def test_sq_slots_are_the_most_important_weights():
    """without calibration the slots are each group's largest |w|; with it, |w| times the channel's RMS, so a
    channel the inputs use heavily takes the slots; either way the output error is below INT4's at the same
    group size and the slot values are in the dense unit (a slot weight dequantizes within d / 2)"""
    from convert.formats import int4
    rng = np.random.default_rng(7)
    rows, cols, group, k = 32, 256, 64, 2
    w = (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)
    d16, q, pos, vals = sq.quantize_parts(w, group, k)
    g = np.abs(w).reshape(rows, -1, group)
    top = np.sort(np.argsort(-g, axis=2, kind="stable")[:, :, :k], axis=2)
    np.testing.assert_array_equal(np.sort(pos, axis=2), top)
    assert np.all(q.reshape(rows, -1, group)[np.arange(rows)[:, None, None], np.arange(cols // group)[None, :, None],
                                              pos.astype(np.int64)] == 0)
    wd = sq.dequantize_parts(d16, q, pos, vals, group)
    slot_w = np.take_along_axis(w.reshape(rows, -1, group), pos.astype(np.int64), axis=2)
    slot_wd = np.take_along_axis(wd.reshape(rows, -1, group), pos.astype(np.int64), axis=2)
    assert np.all(np.abs(slot_wd - slot_w) <= d16.astype(np.float32)[:, :, None] * 0.5 + 1e-7)

    x = rng.standard_normal((512, cols)).astype(np.float32)
    x[:, 3] *= 30.0                                                           # a heavily used input channel
    gram = x.T @ x / len(x)
    d16c, qc, posc, valsc = sq.quantize_parts(w, group, k, np.diag(gram))
    assert np.all(np.any(posc[:, 0, :] == 3, axis=1))                         # every row keeps channel 3 exact

    def out_err(wq):
        delta = wq - w
        return float(np.einsum("rc,cd,rd->", delta, gram, delta))
    int4_err = out_err(int4.dequantize(int4.quantize(w, group), rows, cols, group))
    assert out_err(sq.dequantize_parts(d16c, qc, posc, valsc, group)) < 0.5 * int4_err
    assert out_err(wd) < int4_err


def test_sq_hot_channels_lower_the_w4a4_error():
    """activations with a few outlier channels (as the inputs of real down_proj layers): the channels the
    calibration finds hot stay 8-bit (the search takes some multiple of the sparse fraction of channels, and a
    clipping), and the layer's output through the kernel on held-out rows has a much smaller error than with no
    hot channels and no clipping"""
    rng = np.random.default_rng(8)
    rows, cols, n, group = 48, 512, 512, 64
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((2 * n, cols)).astype(np.float32)
    x[:, [7, 300]] *= 60.0
    fit, held = x[:n], x[n:]
    calib = sq.Calibration(gram=fit.T @ fit / n, absmax=np.abs(fit).max(axis=0), samples=fit[:sq.SAMPLE_ROWS])
    wbytes = sq.quantize(w, group, calib=calib)
    p = sq.unpack(wbytes, rows, cols, group)
    assert p["hot"][7] == 1 and p["hot"][300] == 1
    assert p["hot"].sum() in {m * sq.hot_base(cols) for m in sq.HOT_MULTIPLES}
    assert p["clip"] in [np.float32(c) for c in sq.ACT_CLIPS]
    plain = sq.pack(p["d16"], p["q"], p["pos"], p["vals"])
    y = held @ sq.dequantize(wbytes, rows, cols, group).T
    err = {name: float(((_native.kernel_matmul("scalar", TYPE, group, b, rows, cols, held, 4) - y) ** 2).sum())
           for name, b in (("hot", wbytes), ("plain", plain))}
    assert err["hot"] < 0.3 * err["plain"], err


def test_sq_bits_per_weight_and_sparse_fraction():
    rows, cols = 896, 4864
    assert sq.slots_for(64, sq.DEFAULT_SPARSE) == 3
    assert sq.record_bytes(4, 64) == 5                                          # four slots of 6 + 4 bits
    assert abs(sq.bits_per_weight(rows, cols, 64, 2) - 4.625) < 0.01
    assert abs(sq.bits_per_weight(rows, cols, 64, 4) - 4.875) < 0.01
    assert sq.bits_per_weight(rows, cols, 64, 5) > 5.0                          # past the budget
    with pytest.raises(ValueError):
        sq.slots_for(64, 1.5)
    with pytest.raises(ValueError):
        sq.nbytes(4, 96, 48, 1)                                                 # not a multiple of 32
    with pytest.raises(ValueError):
        sq.nbytes(4, 512, 512, 1)                                               # positions of at most 8 bits


def test_sq_bad_headers_rejected():
    rng = np.random.default_rng(9)
    rows, cols, group, k = 4, 192, 96, 2        # positions of 7 bits, so one can point past the group
    x = np.ones((1, cols), np.float32)
    good = _sq_bytes(rng, rows, cols, group, k, n_hot=2)
    assert _native.kernel_matmul("scalar", TYPE, group, good, rows, cols, x, 4).shape == (1, rows)
    p = sq.unpack(good, rows, cols, group)
    slot_off = sq.HEADER_BYTES + 192 + 64   # header, hot plane, scale plane (4 * 2 * 2 bytes, padded)
    assert p["pos"][0, 0, 0] == good[slot_off] & 0x7F
    bad = []
    b = good.copy(); b[sq.HEADER_BYTES + 1] = 2; bad.append(b)                  # a hot flag of 2
    b = good.copy(); b[4] = 3; bad.append(b)                                    # hot count disagrees
    b = good.copy(); b[slot_off] |= 0x7F; bad.append(b)                         # a position past the group
    for clip in (0.0, 1.5, np.nan, -0.5):                                        # clippings outside (0, 1]
        b = good.copy(); b[8:12] = np.array([clip], "<f4").view(np.uint8); bad.append(b)
    b = good.copy(); b[2:4] = np.array([2], "<u2").view(np.uint8); bad.append(b)     # an unknown cold grid
    for layout in (0, 2):                                                        # the older slot layout, or none
        b = good.copy(); b[12:14] = np.array([layout], "<u2").view(np.uint8); bad.append(b)
    for b in bad:
        for act_bits in (8, 4):
            with pytest.raises(ValueError):
                _native.kernel_matmul("scalar", TYPE, group, b, rows, cols, x, act_bits)
    b = good.copy(); b[0:2] = np.array([group + 1], "<u2").view(np.uint8)         # more slots than the group
    with pytest.raises(ValueError):
        _native.kernel_matmul("scalar", TYPE, group, b, rows, cols, x, 8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act_bits", [8, 4])
def test_sq_kernels_are_batch_invariant(isa, act_bits):
    rng = np.random.default_rng(12)
    rows, cols, n = 24, 384, 9
    x = rng.standard_normal((n, cols)).astype(np.float32)
    for k in (0, 2, 5):
        wbytes = _sq_bytes(rng, rows, cols, 64, k, n_hot=9)
        whole = _native.kernel_matmul(isa, TYPE, 64, wbytes, rows, cols, x, act_bits)
        for i0, i1 in [(0, 1), (1, 3), (3, 7), (7, 9)]:
            np.testing.assert_array_equal(_native.kernel_matmul(isa, TYPE, 64, wbytes, rows, cols, x[i0:i1],
                                                                act_bits), whole[i0:i1])


def test_sq_error_feedback_lowers_the_output_error():
    """with correlated calibration inputs, gptq_parts (error feedback on the same grids) gives a smaller layer
    output error than rounding each weight to nearest, never a larger one for any row, and stays on the grids:
    dense codes in -8..7 and zero at the slots"""
    rng = np.random.default_rng(10)
    rows, cols, group, k = 64, 256, 64, 2
    w = (rng.standard_t(4, (rows, cols)) * 0.02).astype(np.float32)
    mix = rng.standard_normal((cols, cols)).astype(np.float32) * 0.3 + np.eye(cols, dtype=np.float32)
    x = (rng.standard_normal((1024, cols)).astype(np.float32) @ mix) * np.exp(rng.standard_normal(cols)).astype(np.float32)
    gram = x.T @ x / len(x)

    def row_loss(parts):
        delta = (sq.dequantize_parts(*parts, group) - w).astype(np.float64)
        return np.einsum("rc,rc->r", delta @ gram, delta)
    plain = sq.quantize_parts(w, group, k, np.diag(gram))
    fed = sq.gptq_parts(w, group, k, gram)
    assert np.all(row_loss(fed) <= row_loss(plain) * (1 + 1e-6))
    assert row_loss(fed).sum() < 0.9 * row_loss(plain).sum()
    d16, q, pos, vals = fed
    np.testing.assert_array_equal(d16, plain[0])
    np.testing.assert_array_equal(pos, plain[2])
    assert q.min() >= -8 and q.max() <= 7 and vals.min() >= sq.SLOT_MIN and vals.max() <= sq.SLOT_MAX
    assert np.all(np.take_along_axis(q.reshape(rows, -1, group), pos.astype(np.int64), axis=2) == 0)
