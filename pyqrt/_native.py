"""Thin bindings over the C core: call, check the status, raise. Nothing here knows about models or text.

Numpy arrays cross into C only through `as_c_array`, which checks dtype and contiguity, so a wrong array is a
Python error instead of memory read as the wrong type.
"""
import logging
import struct
from collections.abc import Mapping

import numpy as np

from ._qrz import ffi, lib
from .errors import ArchitectureError, ContextOverflowError, FormatError, QrzError

log = logging.getLogger("pyqrt")

_STATUS_ERRORS = {
    lib.QRZ_ERR_IO: OSError,
    lib.QRZ_ERR_FORMAT: FormatError,
    lib.QRZ_ERR_VERSION: FormatError,
    lib.QRZ_ERR_CHECKSUM: FormatError,
    lib.QRZ_ERR_ARCH: ArchitectureError,
    lib.QRZ_ERR_ARG: ValueError,
    lib.QRZ_ERR_MEMORY: MemoryError,
    lib.QRZ_ERR_CONTEXT: ContextOverflowError,
    lib.QRZ_ERR_ABORTED: QrzError,
}

ISA_NAMES = {"scalar": lib.QRZ_ISA_SCALAR, "avx2": lib.QRZ_ISA_AVX2, "neon": lib.QRZ_ISA_NEON,
             "avxvnni": lib.QRZ_ISA_AVXVNNI, "avx512": lib.QRZ_ISA_AVX512}


def check(status, message):
    if status != lib.QRZ_OK:
        raise _STATUS_ERRORS.get(status, QrzError)(message)


def as_c_array(array, dtype, name="array"):
    """A C pointer to a numpy array's data; the array must already have this dtype and be C-contiguous."""
    if not isinstance(array, np.ndarray) or array.dtype != np.dtype(dtype) or not array.flags.c_contiguous:
        raise TypeError(f"{name} must be a C-contiguous numpy array of {np.dtype(dtype)}")
    return ffi.cast(f"{_C_TYPES[np.dtype(dtype)]} *", ffi.from_buffer(array))


_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.int32): "int32_t", np.dtype(np.float64): "double",
            np.dtype(np.uint8): "uint8_t", np.dtype(np.int8): "int8_t"}


# ---- logging: the C core's log lines go to the "pyqrt" logger ----
@ffi.def_extern()
def pyqrt_on_log(user, level, message):
    log.log(level, ffi.string(message).decode("utf-8", "replace"))


lib.qrz_set_log_callback(lib.pyqrt_on_log, ffi.NULL)


# ---- the CPU ----
def isa_default():
    return ffi.string(lib.qrz_isa_name(lib.qrz_isa_default())).decode()


def isa_supported(name):
    return bool(lib.qrz_isa_supported(ISA_NAMES[name]))


# ---- files ----
_ERR_CAP = 1024


def model_open(path, verify, mmap=True):
    """mmap: True maps the file, False copies it into huge-page memory, None lets the C side choose"""
    out = ffi.new("qrz_model **")
    err = ffi.new("char[]", _ERR_CAP)
    flags = (lib.QRZ_OPEN_VERIFY if verify else 0) | {True: lib.QRZ_OPEN_MAP, False: lib.QRZ_OPEN_COPY, None: 0}[mmap]
    status = lib.qrz_model_open(str(path).encode(), flags, out, err, _ERR_CAP)
    check(status, ffi.string(err).decode("utf-8", "replace"))
    return ffi.gc(out[0], lib.qrz_model_free)


_SCALARS = {lib.QRZ_KV_U8: "<B", lib.QRZ_KV_I8: "<b", lib.QRZ_KV_U16: "<H", lib.QRZ_KV_I16: "<h",
            lib.QRZ_KV_U32: "<I", lib.QRZ_KV_I32: "<i", lib.QRZ_KV_F32: "<f", lib.QRZ_KV_BOOL: "<?",
            lib.QRZ_KV_U64: "<Q", lib.QRZ_KV_I64: "<q", lib.QRZ_KV_F64: "<d"}


def _decode_string(raw):
    # surrogateescape keeps arbitrary bytes (token pieces that are partial UTF-8) round-trippable
    return raw.decode("utf-8", "surrogateescape")


def _decode_kv(kv):
    raw = ffi.buffer(kv.data, kv.nbytes)[:]
    if kv.type == lib.QRZ_KV_STRING:
        return _decode_string(raw)
    if kv.type != lib.QRZ_KV_ARRAY:
        return struct.unpack(_SCALARS[kv.type], raw)[0]
    if kv.elem_type == lib.QRZ_KV_U8:
        return raw
    if kv.elem_type == lib.QRZ_KV_STRING:
        items, pos = [], 0
        for _ in range(kv.count):
            (n,) = struct.unpack_from("<Q", raw, pos)
            items.append(_decode_string(raw[pos + 8:pos + 8 + n]))
            pos += 8 + n
        return items
    fmt = _SCALARS[kv.elem_type]
    return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()


class Metadata(Mapping):
    """A .qrz's key/values, decoded from the mapped file each time one is read and not kept: the tokenizer's
    arrays (hundreds of thousands of pieces and merges) would otherwise sit in memory as Python objects, about
    20 MB for a 150k vocabulary, for as long as the model is loaded, even when only token ids are used."""

    def __init__(self, model):
        self._model = model      # the native handle; the values point into its mapping
        view = ffi.new("qrz_kv_view *")
        self._index = {}
        for i in range(lib.qrz_model_n_kv(model)):
            lib.qrz_model_kv(model, i, view)
            self._index[ffi.unpack(view.key, view.key_len).decode("utf-8", "replace")] = i

    def __getitem__(self, key):
        view = ffi.new("qrz_kv_view *")
        lib.qrz_model_kv(self._model, self._index[key], view)
        return _decode_kv(view)

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)

    def __contains__(self, key):
        return key in self._index

    def __repr__(self):
        return f"<pyqrt metadata, {len(self)} keys>"


def model_metadata(model):
    return Metadata(model)


TENSOR_TYPE_NAMES = {lib.QRZ_TYPE_F32: "f32", lib.QRZ_TYPE_F16: "f16", lib.QRZ_TYPE_Q8: "q8", lib.QRZ_TYPE_SDR: "sdr",
                     lib.QRZ_TYPE_INT4: "int4", lib.QRZ_TYPE_FP4: "fp4",
                     lib.QRZ_TYPE_SQ: "sq"}


def model_tensors(model):
    view = ffi.new("qrz_tensor_view *")
    tensors = []
    for i in range(lib.qrz_model_n_tensors(model)):
        lib.qrz_model_tensor(model, i, view)
        tensors.append({
            "name": ffi.unpack(view.name, view.name_len).decode("utf-8", "replace"),
            "type": TENSOR_TYPE_NAMES.get(view.type, str(view.type)),
            "shape": tuple(view.shape[d] for d in range(view.n_dims)),
            "group_size": view.group_size,
            "offset": view.offset,
            "nbytes": view.nbytes,
            "crc32": view.crc32,
        })
    return tensors


# ---- contexts ----
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "8bit": 2, "4bit": 3}


def context_new(model, n_ctx, n_threads, n_batch, isa, act_bits=0, kv_cache=0):
    params = ffi.new("qrz_context_params *", {"n_ctx": n_ctx, "n_threads": n_threads, "n_batch": n_batch, "isa": isa,
                                              "act_bits": act_bits, "kv_cache": kv_cache})
    out = ffi.new("qrz_context **")
    err = ffi.new("char[]", _ERR_CAP)
    status = lib.qrz_context_new(model, params, out, err, _ERR_CAP)
    check(status, ffi.string(err).decode("utf-8", "replace"))
    return ffi.gc(out[0], lib.qrz_context_free)


def context_check(ctx, status):
    if status != lib.QRZ_OK:
        check(status, ffi.string(lib.qrz_context_error(ctx)).decode("utf-8", "replace"))


def detokenize(model, ids, render_special=False):
    tokens = np.ascontiguousarray(ids, dtype=np.int32)
    cap = 16 * len(tokens) + 16
    out = ffi.new("char[]", cap)
    n = lib.qrz_detokenize(model, as_c_array(tokens, np.int32, "ids"), len(tokens), int(render_special), out, cap)
    if n > cap:
        cap = n
        out = ffi.new("char[]", cap)
        n = lib.qrz_detokenize(model, as_c_array(tokens, np.int32, "ids"), len(tokens), int(render_special), out, cap)
    return ffi.unpack(out, n)


# ---- kernels, for the tests ----
def kernel_matmul(isa, type_id, group, weight_bytes, rows, cols, x, act_bits=8):
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.frombuffer(weight_bytes, dtype=np.uint8) if not isinstance(weight_bytes, np.ndarray) else weight_bytes
    w = np.ascontiguousarray(w).view(np.uint8)
    need = lib.qrz_tensor_nbytes_of(type_id, rows, cols, group, ffi.from_buffer(w) if w.nbytes >= 64 else ffi.NULL)
    if need == 0 or w.nbytes != need:
        raise ValueError(f"weight buffer has {w.nbytes} bytes, the type needs {need}")
    y = np.empty((x.shape[0], rows), dtype=np.float32)
    status = lib.qrz_kernel_matmul(ISA_NAMES.get(isa, isa) if isinstance(isa, str) else isa, type_id, group,
                                   act_bits, ffi.from_buffer(w), rows, cols, as_c_array(x, np.float32), x.shape[0],
                                   as_c_array(y, np.float32))
    check(status, f"kernel matmul failed (isa={isa}, type={type_id}, group={group}, shape=({rows}, {cols}))")
    return y


def kernel_dequant_row(type_id, group, weight_bytes, rows, cols, r):
    w = np.ascontiguousarray(np.frombuffer(weight_bytes, dtype=np.uint8))
    out = np.empty(cols, dtype=np.float32)
    status = lib.qrz_kernel_dequant_row(type_id, group, ffi.from_buffer(w), rows, cols, r, as_c_array(out, np.float32))
    check(status, "dequant_row failed")
    return out


def kv_row_bytes(kv, head_dim):
    """bytes of one KV cache row (one position, one kv head) of type kv ("f32", "f16", "8bit", "4bit")"""
    return lib.qrz_kv_row_bytes(KV_CACHE_TYPES[kv] if isinstance(kv, str) else kv, head_dim)


def kernel_softmax(isa, x, scale):
    """Attention's softmax of x (1-D) with the isa's kernel: exp(scale x - max) / sum."""
    out = np.array(x, dtype=np.float32, copy=True).reshape(-1)
    status = lib.qrz_kernel_softmax(ISA_NAMES.get(isa, isa) if isinstance(isa, str) else isa,
                                    as_c_array(out, np.float32), out.size, float(scale))
    check(status, f"kernel softmax failed (isa={isa}, n={out.size}, scale={scale})")
    return out


def kernel_gate(isa, g, u, gelu=False):
    """The MLP's gate with the isa's kernel: act(g) * u elementwise (1-D), act SiLU or GELU (tanh form)."""
    g = np.ascontiguousarray(g, dtype=np.float32).reshape(-1)
    u = np.ascontiguousarray(u, dtype=np.float32).reshape(-1)
    if g.shape != u.shape:
        raise ValueError(f"g and u differ in length: {g.size} and {u.size}")
    h = np.empty_like(g)
    status = lib.qrz_kernel_gate(ISA_NAMES.get(isa, isa) if isinstance(isa, str) else isa, as_c_array(h, np.float32),
                                 as_c_array(g, np.float32), as_c_array(u, np.float32), g.size, 1 if gelu else 0)
    check(status, f"kernel gate failed (isa={isa}, n={g.size}, gelu={gelu})")
    return h


def kernel_kv_rows(isa, kv, x, q=None, a=None):
    """Stores the rows of x (n_rows, head_dim) as KV cache rows of type kv with the isa's kernels. Returns
    (raw uint8 (n_rows, row_bytes), the rows as float32 (n_rows, head_dim), q . row (n_rows,) or None when q is
    None, sum_i a[i] * row i (head_dim,) or None when a is None)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty (n_rows, head_dim) array")
    n_rows, head_dim = x.shape
    kv_id = KV_CACHE_TYPES[kv] if isinstance(kv, str) else kv
    rb = lib.qrz_kv_row_bytes(kv_id, head_dim)
    if rb == 0:
        raise ValueError(f"invalid KV cache type {kv!r} or head_dim {head_dim}")
    raw = np.zeros((n_rows, rb), np.uint8)
    rows = np.empty((n_rows, head_dim), np.float32)
    dots = np.empty(n_rows, np.float32) if q is not None else None
    axpy = np.zeros(head_dim, np.float32) if a is not None else None
    q = np.ascontiguousarray(q, dtype=np.float32) if q is not None else None
    a = np.ascontiguousarray(a, dtype=np.float32) if a is not None else None
    if (q is not None and q.shape != (head_dim,)) or (a is not None and a.shape != (n_rows,)):
        raise ValueError("q must have head_dim values and a one per row")
    opt = lambda arr, dt: as_c_array(arr, dt) if arr is not None else ffi.NULL  # noqa: E731
    status = lib.qrz_kernel_kv_rows(ISA_NAMES.get(isa, isa) if isinstance(isa, str) else isa, kv_id, head_dim,
                                    as_c_array(x, np.float32), n_rows, opt(q, np.float32), opt(a, np.float32),
                                    as_c_array(raw, np.uint8), as_c_array(rows, np.float32), opt(dots, np.float32),
                                    opt(axpy, np.float32))
    check(status, f"kernel kv rows failed (isa={isa}, kv={kv}, head_dim={head_dim})")
    return raw, rows, dots, axpy
