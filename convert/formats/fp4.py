"""FP4: LLM-FP4's 4-bit floating point (docs/QUANTIZATION.md), weights and activations.

A 4-bit float is 1 sign, E exponent and M = 3 - E mantissa bits. Read in units of its smallest step, each of the
three layouts is a codebook of small integers (codebook(E)): E1M2 {0..7}, E2M1 {0,1,2,3,4,6,8,12}, E3M0
{0,1,2,4,..,64}, so a code becomes an integer lane through a 16-entry table and products are integer MACs.

Weights: per tensor, the layout; per group of G columns, an f16 scale d (the exponent bias and clipping range,
searched), value d * lut[code]. Activations (act="4bit"): per tensor, a layout and per input channel an integer
exponent offset k_j (LLM-FP4's pre-shifted exponent bias): channel j is multiplied by 2^k_j before the encode, so
the small channels use the codebook's range, and one scale serves the whole row. The matmul needs
sum_j W_ij 2^-k_j code_j: the 2^-k_j is folded into the weight as LLM-FP4 folds it into the weights' exponents,
but applied in the integer domain to the other factor, as the activation lane lut[code_j] << (K - k_j) with K
the layout's largest offset, so the weights keep 4-bit storage and the product is the same.

The activation scale is static (one calibrated scale for every row, as LLM-FP4 has it), dynamic per row
(c * max_j |2^k_j x_j| / max code, c a searched clipping ratio), or dynamic per group of the weight's group
size (the same formula over the group; the kernel then multiplies d_w * d_x per group, as INT4 does). One scale
per row fails when a few channels are hundreds of times larger than the rest on some tokens (Qwen2.5's
down_proj inputs): every other channel of that row lands in the zero code. The converter searches all three per
tensor on calibration inputs; without calibration it writes per-group scales, the smallest error on any input.

Layout (docs/FORMAT.md): a 64-byte header, the offset plane (cols bytes, padded to 64), the f16 scale plane
(padded to 64), then the nibble plane (nibbles.py) holding the codes 0..15 (bit 3 the sign).
"""
import numpy as np

from . import Calibration, align64, nibbles  # noqa: F401  (Calibration: what quantize takes)

TYPE_ID = 5
QUANTIZED = True
DEFAULT_GROUP = 64
ACTS_4BIT = True
CALIBRATED = True             # quantize() takes calib= (the converter's --calib)
MAX_GROUP = 1 << 16
GROUP_MULTIPLE = 32           # groups are whole 32-value runs of the nibble plane
HEADER_BYTES = 64
EXPONENTS = (1, 2, 3)         # E1M2, E2M1, E3M0
NAMES = {1: "E1M2", 2: "E2M1", 3: "E3M0"}
STATIC, DYNAMIC, GROUPED = 0, 1, 2   # activation scale: one calibrated unit, one per row, one per weight group
ACT_MODES = (DYNAMIC, STATIC, GROUPED)  # what the converter searches
SCALE_CANDIDATES = np.linspace(0.55, 1.0, 10, dtype=np.float32)       # weight clipping, per group
ACT_CLIP_CANDIDATES = np.float32([1.0, 0.85, 0.7, 0.55, 0.4, 0.3, 0.2])  # activation clipping, per tensor
SAMPLE_ROWS = 128             # calibration input rows the activation search runs on


def codebook(e):
    """the 8 magnitudes of the layout with e exponent bits, in units of its smallest step (int32)"""
    m = 3 - e
    mags = list(range(1 << m))                                   # exponent field 0: subnormals
    for p in range(1, 1 << e):
        mags += [((1 << m) + f) << (p - 1) for f in range(1 << m)]
    return np.array(mags[:8], np.int32)


def signed_lut(e):
    """codes 0..15 -> integer values: 0..7 the magnitudes, 8 + i minus magnitude i"""
    mags = codebook(e)
    return np.concatenate([mags, -mags]).astype(np.int32)


def max_act_shift(e):
    """the largest channel offset K: 2^E - 1 (LLM-FP4's range), and small enough that every activation lane
    lut[code] << K fits an int8"""
    top = int(codebook(e)[-1])
    k = 0
    while k < (1 << e) - 1 and top << (k + 1) <= 127:
        k += 1
    return k


def encode(v, e):
    """nearest codes (uint8, 0..15) of values v already in code units: ties to the even magnitude index (which is
    round-half-to-even of the float format), beyond the top magnitude clipped; -0 is code 0"""
    v = np.asarray(v, np.float32)
    mags = codebook(e).astype(np.float32)
    a = np.abs(v)
    idx = np.zeros(v.shape, np.uint8)
    for i in range(7):
        t = (mags[i] + mags[i + 1]) * np.float32(0.5)
        idx += ((a > t) | ((a == t) & (i % 2 == 1))).astype(np.uint8)
    return idx + np.uint8(8) * ((v < 0) & (idx > 0)).astype(np.uint8)


def nbytes(rows, cols, group):
    nibbles.check_shape("fp4", cols, group, MAX_GROUP)
    if group % GROUP_MULTIPLE:
        raise ValueError(f"fp4 needs a group size that is a multiple of {GROUP_MULTIPLE}, got {group}")
    return HEADER_BYTES + align64(cols) + align64(rows * (cols // group) * 2) + rows * cols // 2


# ---- weights ----
def _dequant_groups(d, codes, e):
    return d[..., None] * signed_lut(e).astype(np.float32)[codes]


def quantize_weights(w, group, e, col_weight=None):
    """-> (d16 float16 (rows, ng), codes uint8 (rows, cols)): per group the scale d = c * absmax / top among
    SCALE_CANDIDATES with the smallest squared error, weighted per column by col_weight (cols,) when given"""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    cw = 1.0 if col_weight is None else np.asarray(col_weight, np.float32).reshape(1, cols // group, group)
    top = np.float32(codebook(e)[-1])
    amax = np.abs(g).max(axis=2)
    best_d = best_c = best_err = None
    for c in SCALE_CANDIDATES:
        d16 = (amax * c / top).astype(np.float16)
        d = d16.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = encode(np.where(d[:, :, None] > 0, g / d[:, :, None], 0), e)
        err = (cw * (_dequant_groups(d, codes, e) - g) ** 2).sum(axis=2)
        if best_err is None:
            best_d, best_c, best_err = d16, codes, err
        else:
            take = err < best_err
            best_d = np.where(take, d16, best_d)
            best_c = np.where(take[:, :, None], codes, best_c)
            best_err = np.minimum(err, best_err)
    return best_d, best_c.reshape(rows, cols)


def dequantize_weights(d16, codes, group, e):
    rows, cols = codes.shape
    return _dequant_groups(d16.astype(np.float32), codes.reshape(rows, cols // group, group), e).reshape(rows, cols)


# ---- activations (the numpy twin of the C quantizer QRZ_ACTS_FP4) ----
def act_shifts(absmax, clip, e, group=None):
    """per input channel k_j = clamp(floor(log2(clip * max absmax / absmax_j)), 0, K), the max over the tensor
    (or over j's group of `group` channels): each channel raised by a power of two as far as it stays under the
    clipping level of the span that shares its scale"""
    absmax = np.asarray(absmax, np.float64)
    if group is None:
        level = float(clip) * absmax.max()
    else:
        level = float(clip) * np.repeat(absmax.reshape(-1, group).max(axis=1), group)
    with np.errstate(divide="ignore", invalid="ignore"):   # zero or infinite maxima: nan_to_num below
        k = np.floor(np.log2(level / absmax))
    return np.clip(np.nan_to_num(k, nan=0.0, posinf=99, neginf=0), 0, max_act_shift(e)).astype(np.uint8)


def quantize_acts(x, e, mode, scale, shifts, group=None):
    """x (n, cols) float32 -> (lanes int8 (n, cols), d float32 (n,), or (n, cols // group) for GROUPED):
    x_j ~ d * lanes_j. DYNAMIC: the row's scale is scale * max|2^k x| / top (scale a clipping ratio); GROUPED: the
    same per group of `group` columns; STATIC: scale is the code unit itself."""
    x = np.asarray(x, np.float32)
    n, cols = x.shape
    K = max_act_shift(e)
    top = np.float32(codebook(e)[-1])
    xs = x * (np.float32(2.0) ** shifts.astype(np.float32))[None, :]
    span = group if mode == GROUPED else cols
    if mode == GROUPED and (group is None or cols % group):
        raise ValueError(f"per-group FP4 activations need a group size dividing {cols}, got {group}")
    spans = xs.reshape(n, cols // span, span)
    if mode == STATIC:
        s = np.full(spans.shape[:2], np.float32(scale), np.float32)
    else:
        s = (np.abs(spans).max(axis=2) * np.float32(scale) / top).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)
    codes = encode((spans * inv[:, :, None]).reshape(n, cols), e)
    lanes = signed_lut(e)[codes] << (K - shifts.astype(np.int32))[None, :]
    d = (s * np.float32(2.0 ** -K)).astype(np.float32)
    return lanes.astype(np.int8), (d if mode == GROUPED else d[:, 0])


def dequantize_acts(x, e, mode, scale, shifts, group=None):
    lanes, d = quantize_acts(x, e, mode, scale, shifts, group)
    n, cols = lanes.shape
    d = d.reshape(n, -1)
    return (np.repeat(d, cols // d.shape[1], axis=1) * lanes.astype(np.float32))


# ---- the search ----
def _output_error(delta, gram):
    """sum over rows of delta H delta^T: the squared error the weight error delta adds to the layer's outputs,
    averaged over the calibration inputs"""
    if gram is None:
        return float((delta.astype(np.float64) ** 2).sum())
    return float(np.einsum("rc,rc->", delta @ np.asarray(gram, np.float32), delta, dtype=np.float64))


def search_weights(w, group, gram=None):
    """the weight layout with the smallest output error (weight error without calibration) -> (e, d16, codes)"""
    col_weight = None if gram is None else np.maximum(np.diag(np.asarray(gram, np.float32)), 0)
    best = None
    for e in EXPONENTS:
        d16, codes = quantize_weights(w, group, e, col_weight)
        err = _output_error(dequantize_weights(d16, codes, group, e) - w, gram)
        if best is None or err < best[0]:
            best = (err, e, d16, codes)
    return best[1:]


def _act_candidates(absmax, group, e):
    """(mode, scale, shifts) the activation search tries for layout e (modes in ACT_MODES): per clipping ratio, a
    static and a per-row scale with offsets under the tensor's level, and per-group scales with offsets under
    each group's level and with none"""
    top = float(codebook(e)[-1])
    zero = np.zeros(len(absmax), np.uint8)
    for clip in ACT_CLIP_CANDIDATES:
        shifts = act_shifts(absmax, clip, e)
        if DYNAMIC in ACT_MODES:
            yield DYNAMIC, float(clip), shifts
        scale = float(np.float32(clip * float(np.max(absmax)) / top))
        if STATIC in ACT_MODES and scale > 0 and np.isfinite(scale):   # the loader refuses other static scales
            yield STATIC, scale, shifts
        if GROUPED in ACT_MODES:
            yield GROUPED, float(clip), act_shifts(absmax, clip, e, group)
            yield GROUPED, float(clip), zero


def search_acts(w_hat, absmax, samples, group):
    """the activation layout, offsets, mode and scale whose quantized inputs, through the quantized weights
    w_hat, give outputs nearest the float ones on the calibration sample rows -> (e, mode, scale, shifts)"""
    x = np.asarray(samples, np.float32)
    ref = x @ w_hat.T
    best = None
    for e in EXPONENTS:
        for mode, scale, shifts in _act_candidates(np.asarray(absmax, np.float64), group, e):
            y = dequantize_acts(x, e, mode, scale, shifts, group) @ w_hat.T
            err = float(((y - ref).astype(np.float64) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, e, mode, scale, shifts)
    return best[1:]


# ---- bytes ----
def pack(e_w, d16, codes, e_a=2, mode=GROUPED, scale=1.0, shifts=None):
    rows, cols = codes.shape
    group = cols // d16.shape[1]
    out = np.zeros(nbytes(rows, cols, group), np.uint8)
    out[0], out[1], out[2] = e_w, e_a, mode
    out[4:8] = np.array([scale], "<f4").view(np.uint8)
    off = HEADER_BYTES
    out[off:off + cols] = np.zeros(cols, np.uint8) if shifts is None else shifts
    off += align64(cols)
    sb = d16.astype("<f2").reshape(-1).view(np.uint8)
    out[off:off + sb.size] = sb
    off += align64(sb.size)
    out[off:] = nibbles.pack(codes.astype(np.int16) - 8).reshape(-1)
    return out


def unpack(buf, rows, cols, group):
    """-> dict(e_w, e_a, mode, scale, shifts (cols,), d16 (rows, ng), codes (rows, cols))"""
    buf = np.asarray(buf, np.uint8).reshape(-1)
    ng = cols // group
    off = HEADER_BYTES
    shifts = buf[off:off + cols].copy()
    off += align64(cols)
    d16 = buf[off:off + rows * ng * 2].view("<f2").reshape(rows, ng)
    off += align64(rows * ng * 2)
    codes = (nibbles.unpack(buf[off:], rows, cols).astype(np.int16) + 8).astype(np.uint8)
    return {"e_w": int(buf[0]), "e_a": int(buf[1]), "mode": int(buf[2]), "scale": float(buf[4:8].view("<f4")[0]),
            "shifts": shifts, "d16": d16, "codes": codes}


def quantize(w, group, calib=None):
    """the tensor's bytes. Without calibration: the layout and scales of the smallest weight error, E2M1
    activations with per-group scales and no channel offsets; with it (a Calibration), LLM-FP4's search against the
    layer's output."""
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    nbytes(rows, cols, group)
    gram = None if calib is None else calib.gram
    e_w, d16, codes = search_weights(w, group, gram)
    if calib is None or calib.absmax is None or calib.samples is None or not np.max(calib.absmax) > 0:
        return pack(e_w, d16, codes)
    w_hat = dequantize_weights(d16, codes, group, e_w)
    e_a, mode, scale, shifts = search_acts(w_hat, calib.absmax, calib.samples, group)
    return pack(e_w, d16, codes, e_a, mode, scale, shifts)


def dequantize(buf, rows, cols, group):
    p = unpack(buf, rows, cols, group)
    return dequantize_weights(p["d16"], p["codes"], group, p["e_w"])
