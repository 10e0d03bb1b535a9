"""SDR: QRazor's significant data razoring (docs/QUANTIZATION.md).

Stage 1 scales each output row to an int8 base, b = round(w / s); stage 2 keeps, per group of G base integers
along the reduction axis, a 4-bit signed window m = clamp(round(b / 2^e), -8, 7) below the group's leading one,
and the window's position e. Value: w = s * 2^e * m.

QRazor's rule puts the window at e = max(0, msb(max|b|) - 2). The converter also tries e - 1 per group and 21
row scales s = c * absmax / 127, c in [0.50, 1.00], keeping whichever gives the smaller squared error (weighted
per input column by calibration statistics when given): a search among values the format can store, decoded
exactly as QRazor decodes.

With calibration inputs (a Gram matrix H = mean x x^T of the matrix's input, --calib), the codes are chosen by
error feedback instead (gptq_parts, the idea of GPTQ/OBQ): columns are rounded one at a time and each one's
rounding error is pushed onto the columns not yet rounded, through H's inverse, so that the error of the
layer's output y = W x on the calibration inputs, not of W itself, is what is kept small. Still only codes the
format stores, decoded exactly as QRazor decodes.

Layout (docs/FORMAT.md): float32 row scales (padded to 64 bytes), the shift plane (two 4-bit shifts per byte,
group g in the low nibble when g is even; padded to 64 bytes), then the shared nibble plane (nibbles.py).
"""
import numpy as np

from . import align64, nibbles

TYPE_ID = 3
QUANTIZED = True
DEFAULT_GROUP = 16
ACTS_4BIT = True
CALIBRATED = True             # quantize() takes gram= (the converter's --calib)
MAX_GROUP = 256
MAX_COLS = 1 << 17            # int32 accumulation bound of the W4A8 kernel
MAX_SHIFT = 4                 # an int8 base has its leading one at bit 6 at most (docs/FORMAT.md)
ROW_SCALE_CANDIDATES = np.linspace(0.50, 1.00, 21, dtype=np.float32)


def _flag_bytes(cols, group):
    return (cols // group + 1) // 2


def nbytes(rows, cols, group):
    nibbles.check_shape("sdr", cols, group, MAX_GROUP)
    if cols > MAX_COLS:
        raise ValueError(f"sdr supports at most {MAX_COLS} columns, got {cols}")
    return align64(rows * 4) + align64(rows * _flag_bytes(cols, group)) + rows * cols // 2


def leading_one(x):
    """position of the leading one of non-negative integers (0 for 0 and 1)"""
    x = np.asarray(x, np.int64)
    return np.where(x > 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64), 0)


def razor(b, group, search=True, col_weight=None):
    """b: integer base values (rows, cols) -> (m int8 (rows, cols), e uint8 (rows, ng)). QRazor's window, or with
    search=True the better of it and the next finer one per group (squared error, weighted per column by
    col_weight when given)."""
    rows, cols = b.shape
    g = b.reshape(rows, cols // group, group).astype(np.int64)
    cw = None if col_weight is None else np.asarray(col_weight, np.float64).reshape(cols // group, group)
    e = choose_shifts(g, cw, search)
    m = np.clip(np.rint(g / (2.0 ** e)[:, :, None]), -8, 7)
    return m.astype(np.int8).reshape(rows, cols), e


def quantize_parts(w, group, search=True, col_weight=None):
    """-> (s float32 (rows,), e uint8 (rows, ng), m int8 (rows, cols)). col_weight (cols,): how much an error in
    each input column costs (e.g. the mean square of that input channel on calibration text); None: uniform."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    amax = np.abs(w).max(axis=1)
    best = None
    for c in (ROW_SCALE_CANDIDATES if search else np.ones(1, np.float32)):
        s = (amax * c / np.float32(127)).astype(np.float32)
        safe = np.where(s > 0, s, 1).astype(np.float32)
        b = np.clip(np.rint(w / safe[:, None]), -127, 127)
        m, e = razor(b, group, search, col_weight)
        rec = s[:, None] * (m.astype(np.float32).reshape(rows, -1, group) * (2.0 ** e)[:, :, None]).reshape(rows, cols).astype(np.float32)
        err = ((rec - w).astype(np.float64) ** 2 * (1.0 if col_weight is None else col_weight[None, :])).sum(axis=1)
        if best is None:
            best = [s, e, m, err]
        else:
            take = err < best[3]
            best = [np.where(take, s, best[0]), np.where(take[:, None], e, best[1]),
                    np.where(take[:, None], m, best[2]), np.minimum(err, best[3])]
    return best[0].astype(np.float32), best[1].astype(np.uint8), best[2].astype(np.int8)


def choose_shifts(bf, col_weight=None, search=True):
    """bf: groups of base values w / s along the last axis (..., group) -> each group's shift (...,) as uint8:
    QRazor's, or with search=True the better of it and the next finer one (squared error, weighted by
    col_weight (..., group) when given)"""
    top = np.rint(np.minimum(np.abs(bf).max(axis=-1), 127))
    e = np.clip(leading_one(top) - 2, 0, MAX_SHIFT)
    if not search:
        return e.astype(np.uint8)
    cw = 1.0 if col_weight is None else np.asarray(col_weight, np.float64)
    best_e, best_err = e, None
    for cand in (e, np.maximum(e - 1, 0)):
        step = (2.0 ** cand)[..., None]
        err = (cw * (np.clip(np.rint(bf / step), -8, 7) * step - bf) ** 2).sum(axis=-1)
        if best_err is None:
            best_err = err
        else:
            best_e, best_err = np.where(err < best_err, cand, best_e), np.minimum(err, best_err)
    return best_e.astype(np.uint8)


def gptq_parts(w, group, gram, clippings=(0.75, 0.85, 0.95, 1.0), damp=0.1, act_order=True, block=128):
    """Codes chosen by error feedback against calibration inputs (GPTQ's column-by-column rounding, our own
    implementation). w (rows, cols); gram (cols, cols) = mean x x^T of the inputs; damp: added to H's diagonal,
    as a fraction of its mean (small calibration sets otherwise overfit). act_order: columns are rounded in
    order of decreasing input energy (diag H), so the ones that matter most are rounded first, while the most
    columns remain to absorb their error; a group's shift is chosen when its first column comes up, from the
    group's weights as updated by then. Each row scale candidate s = c * absmax / 127 for c in clippings is run
    (stacked, one pass) and each row keeps the one whose output error (w - w_hat) H (w - w_hat)^T is smallest.
    -> (s, e, m) as quantize_parts."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    H = np.asarray(gram, dtype=np.float64)
    if H.shape != (cols, cols):
        raise ValueError(f"sdr: a Gram matrix of shape {(cols, cols)} is needed, got {H.shape}")
    diag = np.diag(H).copy()
    dead = ~(diag > 0)                               # inputs that were always zero: their weights never count
    if dead.all():
        return quantize_parts(w, group)
    amax = np.abs(w).max(axis=1)
    s = np.concatenate([(amax * np.float32(c) / np.float32(127)).astype(np.float32) for c in clippings])
    k, ng = len(clippings), cols // group
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(cols)
    where = np.empty(cols, np.int64)
    where[order] = np.arange(cols)                   # where[c]: the step at which input column c is rounded
    # the work runs on columns as contiguous rows: wt[j] is the j-th column to round, for every (candidate, row)
    inv_step0 = (1.0 / np.where(s > 0, s, 1)).astype(np.float32)                    # (k*rows,)
    wt = np.ascontiguousarray(np.tile(np.where(dead[None, :], 0, w), (k, 1)).T[order])   # (cols, k*rows)
    Hd = H[np.ix_(order, order)]
    dd = dead[order]
    Hd[dd, dd] = 1.0
    Hd[np.diag_indices(cols)] += damp * diag[~dead].mean()
    # upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j of U says how column j's rounding error spreads
    U = np.linalg.cholesky(np.linalg.inv(Hd)).T.astype(np.float32)
    m = np.zeros((cols, k * rows), np.int8)          # in rounding order
    e = np.zeros((ng, k * rows), np.uint8)
    inv_steps = np.zeros((ng, k * rows), np.float32)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        err = np.zeros((b1 - b0, k * rows), np.float32)
        for j in range(b0, b1):
            g = order[j] // group
            if not inv_steps[g, 0]:                  # this group's first column: fix its shift now
                members = where[g * group:(g + 1) * group]
                e[g] = choose_shifts((wt[members] * inv_step0).T, diag[g * group:(g + 1) * group])
                inv_steps[g] = inv_step0 / np.float32(2.0) ** e[g].astype(np.float32)
            q = np.clip(np.rint(wt[j] * inv_steps[g]), -8, 7)
            m[j] = q
            err[j - b0] = (wt[j] - q / inv_steps[g]) / U[j, j]
            if j + 1 < b1:
                wt[j + 1:b1] -= U[j, j + 1:b1, None] * err[j - b0][None, :]
        if b1 < cols:
            wt[b1:] -= U[b0:b1, b1:].T @ err
    m, e = m[where].T, e.T                           # back to input-column order
    rec = (m.astype(np.float32).reshape(k * rows, -1, group) * (2.0 ** e)[:, :, None]).reshape(k * rows, cols)
    delta = (rec * s[:, None] - np.tile(w, (k, 1))).astype(np.float64)
    loss = np.einsum("rc,rc->r", delta @ H, delta).reshape(k, rows)
    take = loss.argmin(axis=0) * rows + np.arange(rows)
    return s[take], np.ascontiguousarray(e[take]), np.ascontiguousarray(m[take])


def pack(s, e, m, group):
    rows, cols = m.shape
    out = np.zeros(nbytes(rows, cols, group), dtype=np.uint8)
    out[:rows * 4] = s.astype("<f4").view(np.uint8)
    ng, fb = cols // group, _flag_bytes(cols, group)
    ep = np.zeros((rows, fb * 2), np.uint8)
    ep[:, :ng] = e
    flags = ep[:, 0::2] | (ep[:, 1::2] << 4)
    off = align64(rows * 4)
    out[off:off + rows * fb] = flags.reshape(-1)
    off += align64(rows * fb)
    out[off:] = nibbles.pack(m).reshape(-1)
    return out


def quantize(w, group, search=True, col_weight=None, gram=None, calib=None):
    """the tensor's bytes; gram (cols, cols), the mean x x^T of the matrix's calibration inputs (or calib, a
    Calibration holding it), selects the error-feedback rounding (gptq_parts), col_weight (cols,) the weighted
    search, neither the plain search"""
    rows, cols = w.shape
    nbytes(rows, cols, group)
    if calib is not None:
        gram = calib.gram
    if gram is not None:
        return pack(*gptq_parts(w, group, gram), group)
    return pack(*quantize_parts(w, group, search, col_weight), group)


def unpack(buf, rows, cols, group):
    buf = np.asarray(buf, np.uint8).reshape(-1)
    ng, fb = cols // group, _flag_bytes(cols, group)
    s = buf[:rows * 4].view("<f4").astype(np.float32)
    off = align64(rows * 4)
    flags = buf[off:off + rows * fb].reshape(rows, fb)
    e = np.stack([flags & 15, flags >> 4], axis=2).reshape(rows, fb * 2)[:, :ng]
    off += align64(rows * fb)
    m = nibbles.unpack(buf[off:], rows, cols)
    return s, e, m


def dequantize(buf, rows, cols, group):
    s, e, m = unpack(buf, rows, cols, group)
    ints = (m.astype(np.int32).reshape(rows, -1, group) << e.astype(np.int32)[:, :, None]).reshape(rows, cols)
    return (s[:, None] * ints.astype(np.float32)).astype(np.float32)
