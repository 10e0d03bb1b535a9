"""F32: plain row-major float32."""
import numpy as np

TYPE_ID = 0
QUANTIZED = False


def nbytes(rows, cols, group=0):
    return rows * cols * 4


def quantize(w, group=0):
    return np.ascontiguousarray(w, dtype="<f4").reshape(-1).view(np.uint8)


def dequantize(buf, rows, cols, group=0):
    return np.frombuffer(np.asarray(buf, np.uint8).tobytes(), dtype="<f4").reshape(rows, cols).copy()
