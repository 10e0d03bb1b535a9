"""INT4: plain round-to-nearest symmetric 4-bit, one f16 scale per group; the baseline of the 4-bit formats.

Layout (docs/FORMAT.md): a plane of f16 group scales d = absmax / 7, zero-padded to 64 bytes, then the shared
nibble plane (nibbles.py) of m = clamp(round(w / d), -8, 7) computed with the rounded d.
"""
import numpy as np

from . import absmax_groups, align64, nibbles, scales_then_codes

TYPE_ID = 4
QUANTIZED = True
DEFAULT_GROUP = 32
ACTS_4BIT = True
MAX_GROUP = 1 << 16


def nbytes(rows, cols, group):
    nibbles.check_shape("int4", cols, group, MAX_GROUP)
    return align64(rows * (cols // group) * 2) + rows * cols // 2


def quantize(w, group):
    total = nbytes(*w.shape, group)   # checks the shape first
    d16, m = absmax_groups(w, group, 7, -8, 7)
    return scales_then_codes(d16, nibbles.pack(m), total)


def dequantize(buf, rows, cols, group):
    buf = np.asarray(buf, np.uint8).reshape(-1)
    ng = cols // group
    d = buf[:rows * ng * 2].view("<f2").astype(np.float32).reshape(rows, ng, 1)
    m = nibbles.unpack(buf[align64(rows * ng * 2):], rows, cols).astype(np.float32).reshape(rows, ng, group)
    return (m * d).reshape(rows, cols)
