"""Block formats, one module each. A format module defines:

    TYPE_ID        the tensor type id in the .qrz (docs/FORMAT.md)
    QUANTIZED      False for float formats (group_size is then 0)
    nbytes(rows, cols, group)            bytes of a (rows, cols) tensor
    quantize(w, group) -> np.uint8 array the exact bytes of the tensor (w: float32, 2-D)
    dequantize(buf, rows, cols, group)   float32 (rows, cols): the numpy reference the kernels are tested against

Adding a format is adding a module and a row in FORMATS.
"""


def align64(n):
    return (n + 63) // 64 * 64


from . import f16, f32, int4, q8, sdr  # noqa: E402  (the format modules use align64)

FORMATS = {"f32": f32, "f16": f16, "q8": q8, "sdr": sdr, "int4": int4}
# the 4-bit formats keep the token embedding and the output head (and any matrix whose shape they cannot hold)
# in this format at the same group size, as llama.cpp keeps them at 6-8 bits
FOUR_BIT_FALLBACK = "q8"
