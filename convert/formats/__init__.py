"""Block formats, one module each. A format module defines:

    TYPE_ID        the tensor type id in the .qrz (docs/FORMAT.md)
    QUANTIZED      False for float formats (group_size is then 0)
    nbytes(rows, cols, group)            bytes of a (rows, cols) tensor
    quantize(w, group) -> np.uint8 array the exact bytes of the tensor (w: float32, 2-D); a format with
                         CALIBRATED = True also takes calib= (a Calibration: the converter's --calib)
    dequantize(buf, rows, cols, group)   float32 (rows, cols): the numpy reference the kernels are tested against
A format with DEFAULT_SPARSE (sq) also takes sparse= (the converter's --sparse) in quantize, and its nbytes the
k = slots_for(group, sparse) that follows from it.

Adding a format is adding a module and a row in FORMATS.
"""


import numpy as np


def align64(n):
    return (n + 63) // 64 * 64


def absmax_groups(w, group, qmax, lo, hi):
    """Round-to-nearest per group along the last axis: f16 scales d = absmax / qmax, and the codes
    clamp(round_half_even(w / d), lo, hi) computed with the rounded d (so dequantizing is exactly d * code).
    -> (d16 float16 (rows, ng), codes int8 (rows, cols))"""
    rows, cols = w.shape
    g = np.ascontiguousarray(w, dtype=np.float32).reshape(rows, cols // group, group)
    d16 = (np.abs(g).max(axis=2) / np.float32(qmax)).astype(np.float16)
    d = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, :, None] > 0, np.rint(g / d[:, :, None]), 0)
    return d16, np.clip(q, lo, hi).astype(np.int8).reshape(rows, cols)


class Calibration:
    """what the converter measured at one matrix's input on calibration text: gram = mean x x^T (cols, cols),
    absmax = max |x| per column and samples = some input rows (n, cols), the last two only for formats that ask
    for them (SAMPLE_ROWS)"""

    def __init__(self, gram=None, absmax=None, samples=None):
        self.gram, self.absmax, self.samples = gram, absmax, samples


def scales_then_codes(d16, codes, total):
    """the bytes of a Q8 / INT4 tensor: the f16 scale plane, zero-padded to 64 bytes, then the code plane"""
    out = np.zeros(total, dtype=np.uint8)
    scale_bytes = d16.astype("<f2").reshape(-1).view(np.uint8)
    out[:scale_bytes.size] = scale_bytes
    out[align64(scale_bytes.size):] = np.asarray(codes).reshape(-1).view(np.uint8)
    return out


from . import f16, f32, fp4, int4, q8, sdr, sq  # noqa: E402  (the format modules use align64)

FORMATS = {"f32": f32, "f16": f16, "q8": q8, "sdr": sdr, "int4": int4, "fp4": fp4, "sq": sq}
# the 4-bit formats keep the token embedding and the output head (and any matrix whose shape they cannot hold)
# in this format at the same group size, as llama.cpp keeps them at 6-8 bits
FOUR_BIT_FALLBACK = "q8"
