"""The 4-bit mantissa plane SDR and INT4 share (docs/FORMAT.md): values in -8..7 stored as m + 8, each run of 32
values in 16 bytes, byte j holding value j in its low nibble and value j + 16 in its high nibble, so one 16-byte
load and two masks give 32 values in order."""
import numpy as np


def pack(m):
    """m: int array (rows, cols) in -8..7, cols a multiple of 32 -> uint8 (rows, cols // 2)"""
    rows, cols = m.shape
    u = (np.asarray(m, np.int16) + 8).astype(np.uint8).reshape(rows, cols // 32, 2, 16)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(rows, cols // 2)


def unpack(b, rows, cols):
    """inverse of pack: uint8 (rows, cols // 2) -> int8 (rows, cols)"""
    b = np.asarray(b, np.uint8).reshape(rows, cols // 32, 1, 16)
    u = np.concatenate([b & 15, b >> 4], axis=2)
    return (u.astype(np.int8) - 8).reshape(rows, cols)


def check_shape(name, cols, group, max_group):
    if group <= 0 or group % 16 or group > max_group:
        raise ValueError(f"{name} needs a group size that is a multiple of 16 and at most {max_group}, got {group}")
    if cols % group or cols % 32:
        raise ValueError(f"{name} needs a column count divisible by the group size {group} and by 32, got {cols}")
