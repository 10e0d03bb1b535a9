"""F16: row-major IEEE half precision (round to nearest even, as numpy casts)."""
import numpy as np

TYPE_ID = 1
QUANTIZED = False


def nbytes(rows, cols, group=0):
    return rows * cols * 2


def quantize(w, group=0):
    return np.ascontiguousarray(w, dtype=np.float32).astype("<f2").reshape(-1).view(np.uint8)


def dequantize(buf, rows, cols, group=0):
    return np.frombuffer(np.asarray(buf, np.uint8).tobytes(), dtype="<f2").reshape(rows, cols).astype(np.float32)
