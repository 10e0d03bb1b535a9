"""SQ-format: dense 4-bit blocks holding a few high-precision values (docs/QUANTIZATION.md).

Weights: per group (bank) of G input columns an f16 scale d and G 4-bit codes q in -8..7, plus k slots, each an
(in-group position, int8 value v) pair: the weight is d * (q + sum of the slot values at its position). The k
positions of a group are its most important weights, |w_rc| times the input channel's calibration RMS
(sqrt(diag H)), or |w| alone without calibration; they are taken out of the dense part (q = 0 there) before its
scale is chosen, so the outliers no longer set the step of the other G - k values, and they keep int8 precision
in the same unit d. Because a slot's value is in the dense part's unit, the kernel adds v * x[pos] into the
group's integer sum, and the group still costs one float multiply-add.

Activations (act="4bit"): the input channels found hot in calibration (the largest absmax times the weight
column's norm; a fixed fraction of the channels, as the weight slots are of each group) stay 8-bit; the rest
are 4-bit. Both share one scale per group, d = max(max|cold| / 7, max|hot| / 127), so a hot channel is an int8
lane in the same unit and the kernel is the same integer multiply-accumulate. Without calibration no channel is
hot (plain 4-bit per group). act="8bit" is int8 per group (Q8_GROUP), as for INT4.

Layout (docs/FORMAT.md): a 64-byte header (u16 k, u16 0, u32 the number of hot channels), the hot plane (cols
bytes, 1 = hot, padded to 64), the f16 scale plane (padded to 64), the slot plane (per row and group k pairs of
u8 position, i8 value; padded to 64), then the nibble plane (nibbles.py).
"""
import numpy as np

from . import Calibration, align64, nibbles  # noqa: F401  (Calibration: what quantize takes)

TYPE_ID = 6
QUANTIZED = True
DEFAULT_GROUP = 64
DEFAULT_SPARSE = 1 / 32       # high-precision share of each group's weights and of the input channels
ACTS_4BIT = True
CALIBRATED = True
SAMPLE_ROWS = 1               # the converter then also measures each input channel's absmax (hot channels)
MAX_GROUP = 256               # slot positions are bytes
GROUP_MULTIPLE = 32
HEADER_BYTES = 64
SCALE_CANDIDATES = np.linspace(0.6, 1.0, 9, dtype=np.float32)   # clipping of the dense part, per group


def slots_for(group, sparse):
    """k, the high-precision values per group of `group` for a sparse fraction"""
    if not 0 <= sparse <= 1:
        raise ValueError(f"sq needs a sparse fraction in [0, 1], got {sparse}")
    return int(round(sparse * group))


def nbytes(rows, cols, group, k):
    nibbles.check_shape("sq", cols, group, MAX_GROUP)
    if group % GROUP_MULTIPLE:
        raise ValueError(f"sq needs a group size that is a multiple of {GROUP_MULTIPLE}, got {group}")
    if not 0 <= k <= group:
        raise ValueError(f"sq: {k} high-precision values do not fit a group of {group}")
    ng = cols // group
    return HEADER_BYTES + align64(cols) + align64(rows * ng * 2) + align64(rows * ng * k * 2) + rows * cols // 2


def bits_per_weight(rows, cols, group, k):
    return 8 * nbytes(rows, cols, group, k) / (rows * cols)


# ---- weights ----
def quantize_parts(w, group, k, col_weight=None):
    """-> (d16 (rows, ng) float16, q (rows, cols) int8 in -8..7, pos (rows, ng, k) uint8, v (rows, ng, k) int8).
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
        d16 = np.maximum(amax_rest * c / np.float32(7), amax_slot / np.float32(127)).astype(np.float16)
        d = d16.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(d > 0, g / d, 0)
        q = np.where(is_slot, 0, np.clip(np.rint(u), -8, 7))
        v = np.where(is_slot, np.clip(np.rint(u), -127, 127), 0)
        err = (cwg * ((q + v) * d - g) ** 2).sum(axis=2)
        if best is None:
            best = [err, d16, q, v]
        else:
            take = err < best[0]
            best = [np.minimum(err, best[0]), np.where(take, d16, best[1]),
                    np.where(take[:, :, None], q, best[2]), np.where(take[:, :, None], v, best[3])]
    _, d16, q, v = best
    vals = np.take_along_axis(v, pos.astype(np.int64), axis=2).astype(np.int8)
    return d16, q.astype(np.int8).reshape(rows, cols), pos, vals


def dequantize_parts(d16, q, pos, vals, group):
    rows, cols = q.shape
    ng = cols // group
    u = q.astype(np.float32).reshape(rows, ng, group).copy()
    if pos.shape[2]:
        r_idx, g_idx = np.meshgrid(np.arange(rows), np.arange(ng), indexing="ij")
        for s in range(pos.shape[2]):
            np.add.at(u, (r_idx, g_idx, pos[:, :, s].astype(np.int64)), vals[:, :, s].astype(np.float32))
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


def quantize_acts(x, hot, group):
    """x (n, cols) -> (q int8 (n, cols), d float32 (n, cols // group)): per group d = max(max|cold| / 7,
    max|hot| / 127), q = round(x / d) clamped to -8..7 (cold) or -127..127 (hot)"""
    x = np.asarray(x, np.float32)
    n, cols = x.shape
    g = x.reshape(n, cols // group, group)
    h = np.asarray(hot, bool).reshape(1, cols // group, group)
    a = np.abs(g)
    d = np.maximum(np.where(h, 0, a).max(axis=2) / np.float32(7),
                   np.where(h, a, 0).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    u = np.rint(g * inv[:, :, None])
    q = np.where(h, np.clip(u, -127, 127), np.clip(u, -8, 7))
    return q.astype(np.int8).reshape(n, cols), d


def dequantize_acts(x, hot, group):
    q, d = quantize_acts(x, hot, group)
    n, cols = q.shape
    return (q.astype(np.float32).reshape(n, -1, group) * d[:, :, None]).reshape(n, cols)


# ---- bytes ----
def pack(d16, q, pos, vals, hot=None):
    rows, cols = q.shape
    ng, k = pos.shape[1], pos.shape[2]
    group = cols // ng
    out = np.zeros(nbytes(rows, cols, group, k), np.uint8)
    hot = np.zeros(cols, np.uint8) if hot is None else np.asarray(hot, np.uint8)
    out[0:2] = np.array([k], "<u2").view(np.uint8)
    out[4:8] = np.array([int(hot.sum())], "<u4").view(np.uint8)
    off = HEADER_BYTES
    out[off:off + cols] = hot
    off += align64(cols)
    sb = d16.astype("<f2").reshape(-1).view(np.uint8)
    out[off:off + sb.size] = sb
    off += align64(sb.size)
    slots = np.stack([pos.astype(np.uint8), vals.astype(np.int8).view(np.uint8)], axis=3).reshape(-1)
    out[off:off + slots.size] = slots
    off += align64(slots.size)
    out[off:] = nibbles.pack(q).reshape(-1)
    return out


def header_slots(buf):
    return int(np.asarray(buf[0:2], np.uint8).view("<u2")[0])


def unpack(buf, rows, cols, group):
    """-> dict(k, hot (cols,), d16 (rows, ng), q (rows, cols), pos (rows, ng, k), vals (rows, ng, k))"""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    k = header_slots(buf)
    ng = cols // group
    off = HEADER_BYTES
    hot = buf[off:off + cols].copy()
    off += align64(cols)
    d16 = buf[off:off + rows * ng * 2].view("<f2").reshape(rows, ng)
    off += align64(rows * ng * 2)
    slots = buf[off:off + rows * ng * k * 2].reshape(rows, ng, k, 2)
    off += align64(rows * ng * k * 2)
    return {"k": k, "hot": hot, "d16": d16, "q": nibbles.unpack(buf[off:], rows, cols),
            "pos": slots[..., 0].copy(), "vals": slots[..., 1].view(np.int8).copy()}


def quantize(w, group, calib=None, sparse=DEFAULT_SPARSE):
    """the tensor's bytes: k = round(sparse * group) slots per group; with a Calibration, the importance and error
    weights from its Gram matrix and round(sparse * cols) hot activation channels from its channel maxima"""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    k = slots_for(group, sparse)
    nbytes(rows, cols, group, k)
    col_weight = None if calib is None or calib.gram is None else np.diag(np.asarray(calib.gram, np.float32))
    d16, q, pos, vals = quantize_parts(w, group, k, col_weight)
    hot = None
    if calib is not None and calib.absmax is not None and np.max(calib.absmax) > 0:
        hot = hot_channels(calib.absmax, dequantize_parts(d16, q, pos, vals, group), int(round(sparse * cols)))
    return pack(d16, q, pos, vals, hot)


def dequantize(buf, rows, cols, group):
    p = unpack(buf, rows, cols, group)
    return dequantize_parts(p["d16"], p["q"], p["pos"], p["vals"], group)
