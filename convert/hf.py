"""Reading a Hugging Face model directory: config.json and single or sharded *.safetensors.

safetensors files are memory-mapped and read one tensor at a time (the format is an 8-byte header length, a
JSON header, then raw little-endian data), so converting never needs the whole model in memory. A small
reader of our own rather than the safetensors package because its numpy loader cannot return bfloat16.
"""
import json
import mmap
import os
import struct

import numpy as np

from .errors import ConvertError

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def check_dtype(name, dtype, path):
    if dtype not in _DTYPES:
        raise ConvertError(f"tensor '{name}' in '{path}' has dtype {dtype}; supported: F32, F16, BF16 (F64). "
                           f"Save the model in one of those (e.g. model.to(torch.float32).save_pretrained(...))")


def read_config(model_dir):
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConvertError(f"no config.json in '{model_dir}': point the converter at a Hugging Face model directory "
                           f"(config.json, *.safetensors, tokenizer files)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"config.json in '{model_dir}' is not valid JSON ({exc}); restore it from the model's source")
    if not isinstance(config, dict):
        raise ConvertError(f"config.json in '{model_dir}' is not a JSON object")
    return config


class SafetensorsFile:
    def __init__(self, path):
        self.path = path
        try:
            self._file = open(path, "rb")
            size = os.fstat(self._file.fileno()).st_size
            if size < 8:
                raise ConvertError(f"'{path}' is too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > size - 8:
                raise ConvertError(f"'{path}' is truncated (header of {header_len} bytes in a {size}-byte file)")
            header = json.loads(self._file.read(header_len))
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else None
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot read '{path}': {exc}")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        self.size = size

    def load(self, name):
        """The tensor as float32 (bf16 widened exactly, f16 exactly)."""
        info = self.entries[name]
        dtype = info.get("dtype")
        check_dtype(name, dtype, self.path)
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if self.data_start + end > self.size or end - begin != count * np.dtype(_DTYPES[dtype]).itemsize:
            raise ConvertError(f"tensor '{name}' in '{self.path}' lies outside the file or has the wrong size: "
                               f"the file is truncated or corrupt")
        raw = np.frombuffer(self._map, dtype=_DTYPES[dtype], count=count, offset=self.data_start + begin)
        if dtype == "BF16":   # bfloat16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32).reshape(shape)

    def close(self):
        if self._map is not None:
            self._map.close()
        self._file.close()


class TensorSource:
    """All tensors of a model directory, whichever shard holds them."""

    def __init__(self, model_dir):
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ConvertError(f"cannot read '{index_path}': {exc}")
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
        if not shard_names:
            raise ConvertError(f"no *.safetensors files in '{model_dir}'; save the model with "
                               f"save_pretrained(..., safe_serialization=True)")
        self.files = []
        self.where = {}
        for shard in shard_names:
            path = os.path.join(model_dir, shard)
            if not os.path.isfile(path):
                raise ConvertError(f"shard '{shard}' named in the index is missing from '{model_dir}'")
            st = SafetensorsFile(path)
            self.files.append(st)
            for name in st.entries:
                self.where[name] = st

    def names(self):
        return list(self.where)

    def shape(self, name):
        return tuple(self.where[name].entries[name]["shape"])

    def dtype(self, name):
        return self.where[name].entries[name].get("dtype")

    def load(self, name):
        if name not in self.where:
            raise ConvertError(f"tensor '{name}' is missing from the safetensors files")
        return self.where[name].load(name)

    def close(self):
        for st in self.files:
            st.close()
