"""Q8: int8 absmax groups along the reduction axis (QRazor's stage-1 base, with an 8-bit integer).

Layout (docs/FORMAT.md): a plane of f16 group scales d[rows, cols/group], zero-padded to 64 bytes, then the
int8 plane q[rows, cols]. d = absmax/127 rounded to f16, and q is computed with that rounded d, so
dequantize(quantize(w)) is exactly what the kernels multiply with.
"""
import numpy as np

from . import absmax_groups, align64, scales_then_codes

TYPE_ID = 2
QUANTIZED = True
DEFAULT_GROUP = 32


def nbytes(rows, cols, group):
    if group <= 0 or cols % group:
        raise ValueError(f"group size {group} does not divide {cols} columns")
    return align64(rows * (cols // group) * 2) + rows * cols


def quantize(w, group):
    total = nbytes(*w.shape, group)   # checks the shape first
    d16, q = absmax_groups(w, group, 127, -127, 127)
    return scales_then_codes(d16, q, total)


def dequantize(buf, rows, cols, group):
    buf = np.asarray(buf, np.uint8).reshape(-1)
    ng = cols // group
    d = buf[:rows * ng * 2].view("<f2").astype(np.float32).reshape(rows, ng, 1)
    q = buf[align64(rows * ng * 2):].view(np.int8).astype(np.float32).reshape(rows, ng, group)
    return (q * d).reshape(rows, cols)
