"""SQ-format: dense 4-bit blocks holding a few high-precision values (docs/QUANTIZATION.md).

Weights: per group (bank) of G input columns an f16 scale d and G 4-bit codes q in -8..7, plus k slots, each an
in-group position and a value v in -136..119: the weight is d * (q + sum of the slot values at its position). The
k positions of a group are its most important weights, |w_rc| times the input channel's calibration RMS
(sqrt(diag H)), or |w| alone without calibration; they are taken out of the dense part (q = 0 there) before its
scale is chosen, so the outliers no longer set the step of the other G - k values, and they keep 8-bit precision
in the same unit d. Because a slot's value is in the dense part's unit, the kernel adds it times x[pos] into the
group's integer sum, and the group still costs one float multiply-add.

Stored, a slot is its position (the bits of G - 1: 6 at G = 64) and v's high part h (4 bits, -8..7); v's low part
lo (-8..7, v = lo + 16 h) is the nibble at the slot's own position, which the dense part leaves unused. So a slot
costs 10 bits at G = 64, not 16: three slots per group of 64 take 4.75 bits per weight (the default), four 4.875.

Activations (act="4bit"): the input channels found hot in calibration (the largest absmax times the weight
column's norm) stay 8-bit; the rest are 4-bit, on the int4 grid (-8..7) or the E2M1 one (0, 0.5, ..., 6, held
as integers in half steps). Both share one scale per group, d = max(clip * max|cold| / top, max|hot| / 127),
top 7 or 12, so every code is an int8 lane in the same unit and the kernel is the same integer
multiply-accumulate. Per tensor the converter searches how many channels are hot (1/32, 1/16 or 1/8 of them,
whatever the weights' --sparse), the cold grid and the cold clipping (1, 0.9, 0.8) by the layer's output error on
calibration rows. Without calibration no channel is hot, the grid is int4 and clip = 1 (plain 4-bit per group). act="8bit"
is int8 per group (Q8_GROUP), as for INT4.

Layout (docs/FORMAT.md): a 64-byte header (u16 k, u16 cold grid, u32 the number of hot channels, f32 clip, u16
slot layout 1), the hot plane (cols bytes, 1 = hot, padded to 64), the f16 scale plane (padded to 64), the slot
plane (per row and group a record of ceil(k * (pos_bits + 4) / 8) bytes, slot j at bits j * (pos_bits + 4) up,
little-endian, position then h; padded to 64), then the nibble plane (nibbles.py).
"""
import numpy as np

from . import Calibration, align64, nibbles  # noqa: F401  (Calibration: what quantize takes)

TYPE_ID = 6
QUANTIZED = True
DEFAULT_GROUP = 64
DEFAULT_SPARSE = 3 / 64       # high-precision share of each group's weights: 3 slots per 64, 4.75 bits per weight
ACTS_4BIT = True
CALIBRATED = True
SAMPLE_ROWS = 128             # calibration input rows (and each channel's absmax) the activation search runs on
MAX_GROUP = 256               # slot positions of at most 8 bits
GROUP_MULTIPLE = 32
HEADER_BYTES = 64
SLOT_LAYOUT = 1               # header byte 12: slots as (position, high part), the low part in the nibble plane
SLOT_MIN, SLOT_MAX = -136, 119   # lo + 16 h with lo and h in -8..7
SCALE_CANDIDATES = np.linspace(0.6, 1.0, 9, dtype=np.float32)   # clipping of the dense part, per group
HOT_FRACTION = 1 / 32         # act="4bit": the activation search tries HOT_MULTIPLES times this share of the
HOT_MULTIPLES = (1, 2, 4)     # input channels hot; the weights' --sparse does not change it
ACT_CLIPS = (1.0, 0.9, 0.8)   # cold-channel clippings it tries
ROUNDINGS = ("feedback", "nearest")   # with --calib, the converter keeps whichever does better on held-out text


def hot_base(cols):
    """the activation search's smallest hot-channel count; it tries HOT_MULTIPLES of it"""
    return int(round(HOT_FRACTION * cols))


def slots_for(group, sparse):
    """k, the high-precision values per group of `group` for a sparse fraction"""
    if not 0 <= sparse <= 1:
        raise ValueError(f"sq needs a sparse fraction in [0, 1], got {sparse}")
    return int(round(sparse * group))


def pos_bits(group):
    """bits of a slot's position in a group of `group` (those of group - 1, at least 1)"""
    return max(1, (group - 1).bit_length())


def record_bytes(k, group):
    """bytes of one group's k slots: k * (position bits + 4) rounded up"""
    return (k * (pos_bits(group) + 4) + 7) // 8


def nbytes(rows, cols, group, k):
    nibbles.check_shape("sq", cols, group, MAX_GROUP)
    if group % GROUP_MULTIPLE:
        raise ValueError(f"sq needs a group size that is a multiple of {GROUP_MULTIPLE}, got {group}")
    if not 0 <= k <= group:
        raise ValueError(f"sq: {k} high-precision values do not fit a group of {group}")
    ng = cols // group
    return (HEADER_BYTES + align64(cols) + align64(rows * ng * 2) + align64(rows * ng * record_bytes(k, group))
            + rows * cols // 2)


def bits_per_weight(rows, cols, group, k):
    return 8 * nbytes(rows, cols, group, k) / (rows * cols)


# ---- weights ----
def quantize_parts(w, group, k, col_weight=None):
    """-> (d16 (rows, ng) float16, q (rows, cols) int8 in -8..7, pos (rows, ng, k) uint8, v (rows, ng, k) int16 in
    SLOT_MIN..SLOT_MAX).
    col_weight (cols,): the importance and the error weight of each input column (diag H), or None."""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    ng = cols // group
    g = w.reshape(rows, ng, group)
    cw = np.ones(cols, np.float32) if col_weight is None else np.maximum(np.asarray(col_weight, np.float32), 0)
    cwg = cw.reshape(1, ng, group)
    importance = np.abs(g) * np.sqrt(cwg)
    # the k most important positions of each group (stable: ties to the lower position)
    pos = np.argsort(-importance, axis=2, kind="stable")[:, :, :k].astype(np.uint8)
    is_slot = np.zeros(g.shape, bool)
    np.put_along_axis(is_slot, pos.astype(np.int64), True, axis=2)
    rest = np.where(is_slot, 0, g)
    amax_rest = np.abs(rest).max(axis=2)
    amax_slot = np.where(is_slot, np.abs(g), 0).max(axis=2)
    best = None
    for c in SCALE_CANDIDATES:
        d16 = np.maximum(amax_rest * c / np.float32(7), amax_slot / np.float32(SLOT_MAX)).astype(np.float16)
        d = d16.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(d > 0, g / d, 0)
        q = np.where(is_slot, 0, np.clip(np.rint(u), -8, 7))
        v = np.where(is_slot, np.clip(np.rint(u), SLOT_MIN, SLOT_MAX), 0)
        err = (cwg * ((q + v) * d - g) ** 2).sum(axis=2)
        if best is None:
            best = [err, d16, q, v]
        else:
            take = err < best[0]
            best = [np.minimum(err, best[0]), np.where(take, d16, best[1]),
                    np.where(take[:, :, None], q, best[2]), np.where(take[:, :, None], v, best[3])]
    _, d16, q, v = best
    vals = np.take_along_axis(v, pos.astype(np.int64), axis=2).astype(np.int16)
    return d16, q.astype(np.int8).reshape(rows, cols), pos, vals


def gptq_parts(w, group, k, gram, damp=0.1, block=128, with_plain=False):
    """quantize_parts' grids (each group's scale and slot positions, chosen on the original weights), then the
    codes rounded by error feedback against the calibration inputs (GPTQ's column-by-column rounding with static
    groups, our own implementation, as sdr.gptq_parts): columns in order of decreasing input energy (diag H), each
    rounded on its group's grid (SLOT_MIN..SLOT_MAX at a slot position, 4-bit elsewhere) and its error spread over
    the columns not rounded yet through the Cholesky factor of H^-1. damp: added to H's diagonal as a fraction of its mean.
    Each row keeps whichever of this and the plain rounding has the smaller output error (w - ŵ) H (w - ŵ)^T.
    -> (d16, q, pos, vals) as quantize_parts; with_plain: (those, the plain rounding's)"""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    H = np.asarray(gram, np.float64)
    diag = np.diag(H).copy()
    plain = quantize_parts(w, group, k, np.maximum(diag, 0))
    dead = ~(diag > 0)                               # inputs that were always zero: their weights never count
    if dead.all():
        return (plain, plain) if with_plain else plain
    d16, _, pos, _ = plain
    ng = cols // group
    is_slot = np.zeros((rows, ng, group), bool)
    np.put_along_axis(is_slot, pos.astype(np.int64), True, axis=2)
    is_slot = is_slot.reshape(rows, cols)
    order = np.argsort(-diag, kind="stable")
    where = np.empty(cols, np.int64)
    where[order] = np.arange(cols)
    # columns as contiguous rows, in rounding order
    wt = np.ascontiguousarray(np.where(dead[None, :], 0, w).T[order])                          # (cols, rows)
    step = np.ascontiguousarray(np.repeat(d16.astype(np.float32), group, axis=1).T[order])     # (cols, rows)
    inv = np.where(step > 0, np.float32(1) / np.where(step > 0, step, 1), 0).astype(np.float32)
    top = np.where(is_slot.T[order], np.float32(SLOT_MAX), np.float32(7))
    bottom = np.where(is_slot.T[order], np.float32(SLOT_MIN), np.float32(-8))
    Hd = H[np.ix_(order, order)]
    dd = dead[order]
    Hd[dd, dd] = 1.0
    Hd[np.diag_indices(cols)] += damp * diag[~dead].mean()
    U = np.linalg.cholesky(np.linalg.inv(Hd)).T.astype(np.float32)   # H^-1 = U^T U, U upper
    u = np.zeros((cols, rows), np.float32)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        err = np.zeros((b1 - b0, rows), np.float32)
        for j in range(b0, b1):
            u[j] = np.clip(np.rint(wt[j] * inv[j]), bottom[j], top[j])
            err[j - b0] = (wt[j] - u[j] * step[j]) / U[j, j]
            if j + 1 < b1:
                wt[j + 1:b1] -= U[j, j + 1:b1, None] * err[j - b0][None, :]
        if b1 < cols:
            wt[b1:] -= U[b0:b1, b1:].T @ err
    u = u[where].T.reshape(rows, ng, group)                           # back to (rows, cols) order
    q = np.where(is_slot.reshape(rows, ng, group), 0, u).astype(np.int8).reshape(rows, cols)
    vals = np.take_along_axis(u, pos.astype(np.int64), axis=2).astype(np.int16)

    def loss(parts):
        delta = (dequantize_parts(*parts, group) - w).astype(np.float64)
        return np.einsum("rc,rc->r", delta @ H, delta)
    take = loss((d16, q, pos, vals)) <= loss(plain)
    fed = (d16, np.where(take[:, None], q, plain[1]), pos, np.where(take[:, None, None], vals, plain[3]))
    return (fed, plain) if with_plain else fed


def _plus_slots(u, pos, vals):
    """u (rows, ng, group) with every slot's value added at its position (several slots at one position add)"""
    u = u.copy()
    rows, ng, k = pos.shape
    r_idx, g_idx = np.meshgrid(np.arange(rows), np.arange(ng), indexing="ij")
    for s in range(k):
        np.add.at(u, (r_idx, g_idx, pos[:, :, s].astype(np.int64)), vals[:, :, s].astype(u.dtype))
    return u


def dequantize_parts(d16, q, pos, vals, group):
    rows, cols = q.shape
    u = _plus_slots(q.astype(np.float32).reshape(rows, cols // group, group), pos, vals)
    return (u * d16.astype(np.float32)[:, :, None]).reshape(rows, cols)


# ---- activations (the numpy twin of the C quantizer QRZ_ACTS_SQ4_GROUP) ----
def hot_channels(absmax, w, n_hot):
    """the n_hot input channels whose outputs the 4-bit grid would hurt most: absmax_j times |W[:, j]|"""
    score = np.asarray(absmax, np.float64) * np.sqrt((np.asarray(w, np.float64) ** 2).sum(axis=0))
    score = np.nan_to_num(score, nan=0.0, posinf=np.finfo(np.float64).max)
    hot = np.zeros(len(score), np.uint8)
    if n_hot:
        hot[np.argsort(-score, kind="stable")[:n_hot]] = 1
    return hot


COLD_INT4, COLD_E2M1 = 0, 1   # the header's grid of the cold activation channels (QRZ_SQ_COLD_*)
E2M1_HALF_STEPS = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float32)   # E2M1's 0, 0.5, 1, 1.5, 2, 3, 4, 6, doubled
E2M1_TIES = np.array([0.5, 1.5, 2.5, 3.5, 5, 7, 10], np.float32)    # the midpoints between them


def quantize_acts(x, hot, group, clip=1.0, grid=COLD_INT4):
    """x (n, cols) -> (q int8 (n, cols), d float32 (n, cols // group)): per group d = max(clip * max|cold| / top,
    max|hot| / 127). Cold channels by grid: COLD_INT4 (top 7) round(x / d) clamped to -8..7; COLD_E2M1 (top 12)
    the nearest 4-bit E2M1 value of x / d counted in half steps (0, +-1, 2, 3, 4, 6, 8, 12; a tie to the larger
    magnitude). Hot channels round(x / d) clamped to -127..127."""
    x = np.asarray(x, np.float32)
    n, cols = x.shape
    g = x.reshape(n, cols // group, group)
    h = np.asarray(hot, bool).reshape(1, cols // group, group)
    a = np.abs(g)
    top = np.float32(12 if grid == COLD_E2M1 else 7)
    d = np.maximum(np.float32(clip) * np.where(h, 0, a).max(axis=2) / top,
                   np.where(h, a, 0).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    u = g * inv[:, :, None]
    if grid == COLD_E2M1:
        cold = E2M1_HALF_STEPS[np.searchsorted(E2M1_TIES, np.abs(u), side="right")] * np.where(u < 0, -1, 1)
    else:
        cold = np.clip(np.rint(u), -8, 7)
    q = np.where(h, np.clip(np.rint(u), -127, 127), cold)
    return q.astype(np.int8).reshape(n, cols), d


def dequantize_acts(x, hot, group, clip=1.0, grid=COLD_INT4):
    q, d = quantize_acts(x, hot, group, clip, grid)
    n, cols = q.shape
    return (q.astype(np.float32).reshape(n, -1, group) * d[:, :, None]).reshape(n, cols)


def search_acts(w_hat, absmax, samples, group, n_hot):
    """the hot channels, cold grid and cold clipping whose quantized inputs, through the quantized weights w_hat,
    give outputs nearest the float ones on the calibration sample rows -> (hot (cols,) uint8, clip, grid)"""
    x = np.asarray(samples, np.float32)
    ref = x @ w_hat.T
    best = None
    for mult in HOT_MULTIPLES:
        hot = hot_channels(absmax, w_hat, min(mult * n_hot, x.shape[1]))
        for grid in (COLD_INT4, COLD_E2M1):
            for clip in ACT_CLIPS:
                xq = dequantize_acts(x, hot, group, clip, grid)
                err = float(((xq @ w_hat.T - ref).astype(np.float64) ** 2).sum())
                if best is None or err < best[0]:
                    best = (err, hot, clip, grid)
    return best[1:]


# ---- bytes ----
def _first_at_position(pos):
    """(rows, ng, k) bool: slot s is the first of its group at its position (several slots may share one)"""
    first = np.ones(pos.shape, bool)
    for s in range(1, pos.shape[2]):
        first[:, :, s] = ~(pos[:, :, :s] == pos[:, :, s:s + 1]).any(axis=2)
    return first


def stored_form(q, pos, vals):
    """the parts (q, pos, vals) as stored -> (codes (rows, ng, group) int32 in -8..7, high (rows, ng, k) in -8..7):
    the value at a slot's position, q there plus the slots' values, is kept as its low part in the nibble plane and
    its high part in the first slot at that position (any others there get 0); it must lie in SLOT_MIN..SLOT_MAX"""
    rows, cols = q.shape
    ng, k = pos.shape[1], pos.shape[2]
    group = cols // ng
    codes = np.asarray(q, np.int32).reshape(rows, ng, group).copy()
    if not k:
        return codes, np.zeros((rows, ng, 0), np.int32)
    p64 = pos.astype(np.int64)
    if p64.max() >= group:
        raise ValueError(f"sq: a slot position outside its group of {group}")
    total = _plus_slots(codes, pos, np.asarray(vals, np.int32))
    at_slot = np.take_along_axis(total, p64, axis=2)
    if at_slot.min() < SLOT_MIN or at_slot.max() > SLOT_MAX:
        raise ValueError(f"sq: a value at a slot position outside {SLOT_MIN}..{SLOT_MAX}")
    low = (at_slot + 8) % 16 - 8
    np.put_along_axis(codes, p64, low, axis=2)
    return codes, np.where(_first_at_position(pos), (at_slot - low) // 16, 0)


def pack(d16, q, pos, vals, hot=None, clip=1.0, grid=COLD_INT4):
    """the tensor's bytes from its parts (quantize_parts' d16, q, pos, vals)"""
    return pack_stored(d16, *stored_form(q, pos, vals), pos, hot, clip, grid)


def pack_stored(d16, codes, high, pos, hot=None, clip=1.0, grid=COLD_INT4):
    """the tensor's bytes from what it stores: codes (rows, ng, group) in -8..7, each slot's high part (rows, ng,
    k) in -8..7 and position (rows, ng, k); the weight at column c of a group is d * (codes[c] + 16 * the high
    parts of the group's slots at c)"""
    rows, ng, group = codes.shape
    cols, k = ng * group, pos.shape[2]
    out = np.zeros(nbytes(rows, cols, group, k), np.uint8)
    hot = np.zeros(cols, np.uint8) if hot is None else np.asarray(hot, np.uint8)
    out[0:2] = np.array([k], "<u2").view(np.uint8)
    out[2:4] = np.array([grid], "<u2").view(np.uint8)
    out[4:8] = np.array([int(hot.sum())], "<u4").view(np.uint8)
    out[8:12] = np.array([clip], "<f4").view(np.uint8)
    out[12:14] = np.array([SLOT_LAYOUT], "<u2").view(np.uint8)
    off = HEADER_BYTES
    out[off:off + cols] = hot
    off += align64(cols)
    sb = d16.astype("<f2").reshape(-1).view(np.uint8)
    out[off:off + sb.size] = sb
    off += align64(sb.size)
    record = record_bytes(k, group)
    if k:
        pb, high = pos_bits(group), np.asarray(high, np.int64)
        if high.min() < -8 or high.max() > 7 or int(pos.max()) >= 1 << pb:
            raise ValueError("sq: a slot's high part outside -8..7 or a position wider than its bits")
        width = pb + 4
        fields = (pos.astype(np.int64) | ((high & 15) << pb)).reshape(rows * ng, k)
        bits = ((fields[:, :, None] >> np.arange(width)) & 1).astype(np.uint8).reshape(rows * ng, k * width)
        bits = np.pad(bits, ((0, 0), (0, 8 * record - k * width)))
        slots = np.packbits(bits, axis=1, bitorder="little").reshape(-1)
        out[off:off + slots.size] = slots
    off += align64(rows * ng * record)
    out[off:] = nibbles.pack(np.asarray(codes).reshape(rows, cols)).reshape(-1)
    return out


def header_slots(buf):
    return int(np.asarray(buf[0:2], np.uint8).view("<u2")[0])


def unpack(buf, rows, cols, group):
    """-> dict(k, hot (cols,), clip, grid, d16 (rows, ng), q (rows, cols), pos (rows, ng, k), vals (rows, ng, k),
    codes (rows, ng, group), high (rows, ng, k)): q and vals as quantize_parts gives them (q = 0 at a slot's
    position, the value there in the first slot at it; pack's inverse on those), codes and high as stored
    (pack_stored's inverse)"""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    k = header_slots(buf)
    ng = cols // group
    off = HEADER_BYTES
    hot = buf[off:off + cols].copy()
    off += align64(cols)
    d16 = buf[off:off + rows * ng * 2].view("<f2").reshape(rows, ng)
    off += align64(rows * ng * 2)
    record = record_bytes(k, group)
    rec = buf[off:off + rows * ng * record].reshape(rows * ng, record)
    off += align64(rows * ng * record)
    codes = nibbles.unpack(buf[off:], rows, cols).astype(np.int32).reshape(rows, ng, group)
    pb = pos_bits(group)
    width = pb + 4
    bits = np.unpackbits(rec, axis=1, bitorder="little")[:, :k * width].reshape(rows * ng, k, width)
    fields = (bits.astype(np.int64) << np.arange(width)).sum(axis=2).reshape(rows, ng, k)
    pos = (fields & ((1 << pb) - 1)).astype(np.uint8)
    high = (fields >> pb) & 15
    high = high - ((high & 8) << 1)
    p64 = pos.astype(np.int64)
    total = _plus_slots(codes, pos, 16 * high)
    vals = np.where(_first_at_position(pos), np.take_along_axis(total, p64, axis=2), 0).astype(np.int16)
    q = codes.copy()
    np.put_along_axis(q, p64, 0, axis=2)
    return {"k": k, "hot": hot, "clip": float(buf[8:12].view("<f4")[0]), "grid": int(buf[2:4].view("<u2")[0]),
            "d16": d16, "q": q.astype(np.int8).reshape(rows, cols), "pos": pos, "vals": vals,
            "codes": codes, "high": high.astype(np.int8)}


def quantize(w, group, calib=None, sparse=DEFAULT_SPARSE, rounding="feedback"):
    """the tensor's bytes: k = round(sparse * group) slots per group; with a Calibration, the importance and error
    weights from its Gram matrix, the codes by error feedback against it (gptq_parts; rounding="nearest": rounded
    to nearest on the same grids instead), and the hot activation channels and cold clipping searched on its
    sample rows"""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return quantize_roundings(w, group, calib, sparse, (rounding,))[rounding]


def quantize_roundings(w, group, calib=None, sparse=DEFAULT_SPARSE, roundings=ROUNDINGS):
    """{rounding: the tensor's bytes} for each of roundings (one Cholesky factor for both). The converter writes
    a candidate file per rounding and keeps the one with the lower perplexity on held-out calibration text: error
    feedback halves each layer's output error on its own inputs, yet on Gemma-3 it raised the model's perplexity
    (docs/QUANTIZATION.md), so whether it helps is measured on the whole model."""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    k = slots_for(group, sparse)
    nbytes(rows, cols, group, k)
    if calib is None or calib.gram is None:
        plain = quantize_parts(w, group, k)
        candidates = {"feedback": plain, "nearest": plain}
    else:
        fed, plain = gptq_parts(w, group, k, calib.gram, with_plain=True)
        candidates = {"feedback": fed, "nearest": plain}
    out = {}
    for rounding in roundings:
        parts = candidates[rounding]
        if calib is None or calib.absmax is None or calib.samples is None or not np.max(calib.absmax) > 0:
            out[rounding] = pack(*parts)
            continue
        acts = search_acts(dequantize_parts(*parts, group), calib.absmax, calib.samples, group,
                           hot_base(cols))
        out[rounding] = pack(*parts, *acts)
    return out


def dequantize(buf, rows, cols, group):
    p = unpack(buf, rows, cols, group)
    return dequantize_parts(p["d16"], p["q"], p["pos"], p["vals"], group)
