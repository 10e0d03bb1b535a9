"""Writing a .qrz (docs/FORMAT.md): header, typed key/values, tensor directory, 64-byte aligned data.

The directory is written before the data, so every tensor's type, shape and size must be known up front;
data is then streamed one tensor at a time and the CRCs are patched in at the end. The file is written under
a temporary name and renamed into place only when complete.
"""
import os
import struct
import zlib

import numpy as np

MAGIC = b"QRZF"
ENDIAN_MARK = 0x0A0B0C0D
VERSION = 1
HEADER_BYTES = 48
ALIGN = 64

# value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
               U64: "<Q", I64: "<q", F64: "<d"}
_NUMPY_ELEM = {U8: "<u1", I8: "<i1", U16: "<u2", I16: "<i2", U32: "<u4", I32: "<i4", F32: "<f4", U64: "<u8",
               I64: "<i8", F64: "<f8"}


def _align(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _string(value):
    raw = value if isinstance(value, (bytes, bytearray)) else value.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw)) + bytes(raw)


class KV:
    """A metadata value with an explicit type; plain Python values get one from `typed`."""

    def __init__(self, type_, value, elem_type=None):
        self.type, self.value, self.elem_type = type_, value, elem_type

    def encode(self):
        if self.type == STRING:
            return struct.pack("<I", STRING) + _string(self.value)
        if self.type == ARRAY:
            head = struct.pack("<IIQ", ARRAY, self.elem_type, len(self.value))
            if self.elem_type == STRING:
                return head + b"".join(_string(v) for v in self.value)
            if self.elem_type == BOOL:
                return head + bytes(1 if v else 0 for v in self.value)
            return head + np.asarray(self.value, dtype=_NUMPY_ELEM[self.elem_type]).tobytes()
        return struct.pack("<I", self.type) + struct.pack(_SCALAR_FMT[self.type], self.value)


def typed(value):
    """The natural .qrz type of a Python value: bool -> BOOL, int -> U32 (I32 if negative), float -> F32,
    str -> STRING, bytes -> ARRAY of U8, list of str -> ARRAY of STRING, list of int -> ARRAY of I32."""
    if isinstance(value, KV):
        return value
    if isinstance(value, bool):
        return KV(BOOL, value)
    if isinstance(value, int):
        return KV(I32 if value < 0 else U32, value)
    if isinstance(value, float):
        return KV(F32, value)
    if isinstance(value, str):
        return KV(STRING, value)
    if isinstance(value, (bytes, bytearray)):
        return KV(ARRAY, np.frombuffer(bytes(value), np.uint8), U8)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (str, bytes)) for v in value):
            return KV(ARRAY, list(value), STRING)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return KV(ARRAY, list(value), I32)
        if all(isinstance(v, (int, float)) for v in value):
            return KV(ARRAY, list(value), F32)
    raise TypeError(f"cannot store a {type(value).__name__} in .qrz metadata")


class TensorSpec:
    def __init__(self, name, type_id, shape, group_size, nbytes):
        self.name, self.type_id, self.shape = name, type_id, tuple(int(d) for d in shape)
        self.group_size, self.nbytes = int(group_size), int(nbytes)
        self.offset = 0
        self.crc = 0


def _directory_entry(t):
    return (_string(t.name) + struct.pack("<II", t.type_id, len(t.shape))
            + b"".join(struct.pack("<Q", d) for d in t.shape)
            + struct.pack("<IQQI", t.group_size, t.offset, t.nbytes, t.crc))


class QrzWriter:
    """with QrzWriter(path, metadata, specs) as w: w.write_tensor(name, bytes) for each spec, in order."""

    def __init__(self, path, metadata, specs):
        self.path = os.fspath(path)
        self.tmp_path = f"{self.path}.tmp-{os.getpid()}"
        self.kvs = [(k, typed(v)) for k, v in metadata.items()]
        self.specs = list(specs)
        offset = 0
        for t in self.specs:
            if len(t.shape) < 1 or len(t.shape) > 4:
                raise ValueError(f"tensor {t.name} has {len(t.shape)} dimensions (1 to 4 allowed)")
            t.offset = offset
            offset = _align(offset + t.nbytes)
        self.data_size = offset
        self._next = 0
        self._file = None

    def _meta_bytes(self):
        kv = b"".join(_string(k) + v.encode() for k, v in self.kvs)
        return kv + b"".join(_directory_entry(t) for t in self.specs)

    def __enter__(self):
        meta = self._meta_bytes()
        self.data_offset = _align(HEADER_BYTES + len(meta))
        self.file_size = self.data_offset + self.data_size
        self._file = open(self.tmp_path, "wb")
        self._file.write(b"\0" * self.data_offset)   # header and directory are rewritten once CRCs are known
        return self

    def write_tensor(self, name, data):
        t = self.specs[self._next]
        if t.name != name:
            raise ValueError(f"tensor {name} written out of order (expected {t.name})")
        raw = memoryview(np.ascontiguousarray(data)).cast("B")
        if raw.nbytes != t.nbytes:
            raise ValueError(f"tensor {name}: {raw.nbytes} bytes given, {t.nbytes} declared")
        self._file.seek(self.data_offset + t.offset)
        self._file.write(raw)
        t.crc = zlib.crc32(raw)
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                if self._next != len(self.specs):
                    raise ValueError(f"only {self._next} of {len(self.specs)} tensors were written")
                self._file.truncate(self.file_size)
                meta = self._meta_bytes()
                region = (struct.pack("<QQQQ", len(self.kvs), len(self.specs), self.data_offset, self.file_size)
                          + meta + b"\0" * (self.data_offset - HEADER_BYTES - len(meta)))
                self._file.seek(0)
                self._file.write(MAGIC + struct.pack("<III", ENDIAN_MARK, VERSION, zlib.crc32(region)) + region)
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self.tmp_path, self.path)
        finally:
            if not self._file.closed:
                self._file.close()
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
        return False
