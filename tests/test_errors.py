"""Bad input never crashes the process: each case is a clear Python exception naming the problem and the fix.

The .qrz cases run in a child process too, so a crash (a signal) would fail the test instead of killing pytest.
They use a tiny random Llama written by the converter, so they need no download.
"""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import pyqrt
from convert import ConvertError, convert
from tests.tiny import make_tiny_llama

HEADER = 48


@pytest.fixture(scope="module")
def tiny_qrz(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_llama(d / "hf")
    return str(convert(hf, d / "tiny-q8.qrz", fmt="q8", group_size=16, progress=False))


def _patched(tmp_path, src, edit, name="bad.qrz"):
    data = bytearray(open(src, "rb").read())
    edit(data)
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return str(out)


def _fix_meta_crc(data):
    data_offset = struct.unpack_from("<Q", data, 32)[0]
    struct.pack_into("<I", data, 12, zlib.crc32(bytes(data[16:data_offset])))


def _load_in_child(path, **kw):
    """load in a fresh interpreter; returns (returncode, stderr). A signal shows as a negative return code."""
    code = (f"import pyqrt, sys\ntry:\n    pyqrt.load({path!r}, **{kw!r})\nexcept pyqrt.QrzError as e:\n"
            f"    print(type(e).__name__, e, file=sys.stderr); sys.exit(3)\nexcept OSError as e:\n"
            f"    print(type(e).__name__, e, file=sys.stderr); sys.exit(4)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    return run.returncode, run.stderr


def _expect(path, exc_type, fragment, **kw):
    with pytest.raises(exc_type) as info:
        pyqrt.load(path, **kw)
    assert fragment.lower() in str(info.value).lower(), str(info.value)
    rc, err = _load_in_child(path, **kw)
    assert rc in (3, 4), (rc, err)


def test_tiny_model_loads_and_runs(tiny_qrz):
    m = pyqrt.load(tiny_qrz, threads=1)
    out = m.generate_tokens([1, 2, 3], max_tokens=5)
    assert len(out) == 5 and all(0 <= t < m.n_vocab for t in out)


@pytest.mark.parametrize("cut", [3, 20, 47, 100, 2000, -1000, -1])
def test_truncated_file(tmp_path, tiny_qrz, cut):
    size = os.path.getsize(tiny_qrz)
    keep = cut if cut > 0 else size + cut
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__delitem__(slice(keep, None)))
    _expect(path, pyqrt.FormatError, "truncated" if keep >= HEADER else "too short")


def test_wrong_magic(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(slice(0, 4), b"NOPE"))
    _expect(path, pyqrt.FormatError, "not a .qrz")


def test_gguf_file_is_recognized(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(slice(0, 4), b"GGUF"))
    _expect(path, pyqrt.FormatError, "python -m convert")


def test_wrong_version(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: struct.pack_into("<I", d, 8, 2))
    _expect(path, pyqrt.FormatError, "version 2")


def test_big_endian_marker(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: struct.pack_into(">I", d, 4, 0x0A0B0C0D))
    _expect(path, pyqrt.FormatError, "big-endian")


def test_corrupt_metadata_fails_checksum(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(200, d[200] ^ 0x40))
    _expect(path, pyqrt.FormatError, "checksum")


def test_corrupt_tensor_data_fails_checksum(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(len(d) - 100, d[len(d) - 100] ^ 0x01))
    _expect(path, pyqrt.FormatError, "checksum")
    pyqrt.load(path, verify=False)   # the caller may skip the data checksums; the structure is still sound


def _set_string_value(data, key, new_value):
    """rewrite a STRING metadata value in place (same length) and fix the metadata CRC"""
    k = struct.pack("<Q", len(key)) + key.encode()
    at = bytes(data).index(k) + len(k)
    (n,) = struct.unpack_from("<Q", data, at + 4)
    assert n == len(new_value)
    data[at + 12:at + 12 + n] = new_value.encode()
    _fix_meta_crc(data)


def test_unsupported_architecture(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: _set_string_value(d, "general.architecture", "mamba"))
    _expect(path, pyqrt.ArchitectureError, "architecture 'mamba' is not supported")
    assert pyqrt.open_file(path).metadata["general.architecture"] == "mamba"   # still inspectable


def test_hostile_counts_and_offsets(tmp_path, tiny_qrz):
    def huge_counts(d):
        struct.pack_into("<Q", d, 16, 2**62)
        _fix_meta_crc(d)
    _expect(_patched(tmp_path, tiny_qrz, huge_counts, "counts.qrz"), pyqrt.FormatError, "corrupt")

    def bad_string_length(d):
        struct.pack_into("<Q", d, HEADER, 2**63)    # the first key's length
        _fix_meta_crc(d)
    _expect(_patched(tmp_path, tiny_qrz, bad_string_length, "strlen.qrz"), pyqrt.FormatError, "truncated or corrupt")


def test_random_corruption_never_crashes(tmp_path, tiny_qrz):
    """flip random bytes in the header and metadata (checksum fixed up, so the parser itself is exercised)"""
    data0 = bytearray(open(tiny_qrz, "rb").read())
    data_offset = struct.unpack_from("<Q", data0, 32)[0]
    rng = np.random.default_rng(0)
    path = str(tmp_path / "fuzz.qrz")
    code = ["import pyqrt, sys", "ok = bad = 0", f"for i in range({40}):",
            f"    p = {path!r} + str(i)",
            "    try:", "        pyqrt.load(p, threads=1); ok += 1",
            "    except (pyqrt.QrzError, ValueError, OSError, MemoryError): bad += 1",
            "print(ok, bad)"]
    for i in range(40):
        d = bytearray(data0)
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(16, data_offset))
            d[pos] = int(rng.integers(0, 256))
        _fix_meta_crc(d)
        with open(path + str(i), "wb") as f:
            f.write(d)
    run = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_missing_file_and_directory():
    with pytest.raises(FileNotFoundError, match="no such model file"):
        pyqrt.load("/nonexistent/model.qrz")
    with pytest.raises(OSError):
        pyqrt.load(os.path.dirname(__file__))


def test_missing_tokenizer(tmp_path, tiny_qrz):
    def rename_tokenizer_keys(d):
        for key in (b"tokenizer.hf_json", b"tokenizer.kind"):
            at = bytes(d).index(key)
            d[at:at + len(key)] = key.replace(b"tokenizer", b"tokenizex")
        _fix_meta_crc(d)
    m = pyqrt.load(_patched(tmp_path, tiny_qrz, rename_tokenizer_keys), threads=1)
    with pytest.raises(pyqrt.TokenizerError, match="no tokenizer"):
        m.tokenize("hello")
    assert len(m.generate_tokens([1, 2], max_tokens=2)) == 2   # ids still work without a tokenizer


def test_prompt_longer_than_context(tiny_qrz):
    m = pyqrt.load(tiny_qrz, threads=1, ctx=64)
    long_prompt = list(range(5, 5 + 100))
    with pytest.raises(pyqrt.ContextOverflowError, match="100 tokens.*context holds 64.*ctx="):
        m.generate(long_prompt, max_tokens=4)
    with pytest.raises(pyqrt.ContextOverflowError, match="ctx="):
        m.logits(long_prompt)
    with pytest.raises(pyqrt.ContextOverflowError):
        m.score(long_prompt)
    out = m.generate_tokens(list(range(5, 60)), max_tokens=50)   # generation stops when the context is full
    assert len(out) <= 64 - 55 + 1 and m.last_timings["finish"] == "context"


@pytest.mark.parametrize("kwargs,exc,fragment", [
    ({"threads": -3}, ValueError, "threads must be >= 1"),
    ({"threads": "two"}, TypeError, "threads must be an integer"),
    ({"ctx": 0}, ValueError, "ctx must be >= 1"),
    ({"flash_attention": True}, TypeError, "unknown option"),
    ({"isa": "sse9"}, ValueError, "isa must be one of"),
])
def test_bad_load_arguments(tiny_qrz, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        pyqrt.load(tiny_qrz, **kwargs)


@pytest.mark.parametrize("kwargs,exc,fragment", [
    ({"temperature": -1}, ValueError, "temperature"),
    ({"top_p": 2}, ValueError, "top_p"),
    ({"top_p": 0}, ValueError, "top_p"),
    ({"min_p": -0.1}, ValueError, "min_p"),
    ({"top_k": -5}, ValueError, "top_k"),
    ({"max_tokens": "10"}, TypeError, "max_tokens must be an integer"),
    ({"max_tokens": -2}, ValueError, "max_tokens"),
    ({"repeat_penalty": 0}, ValueError, "repeat_penalty"),
    ({"stop": 5}, TypeError, "stop"),
    ({"seed": -1}, ValueError, "seed"),
    ({"temprature": 0.5}, TypeError, "unknown sampling option"),
])
def test_bad_sampling_arguments(tiny_qrz, kwargs, exc, fragment):
    m = pyqrt.load(tiny_qrz, threads=1)
    with pytest.raises(exc, match=fragment):
        m.generate([1, 2, 3], **kwargs)


def test_bad_token_ids(tiny_qrz):
    m = pyqrt.load(tiny_qrz, threads=1)
    with pytest.raises(ValueError, match="outside"):
        m.logits([1, 2, m.n_vocab])
    with pytest.raises(ValueError, match="outside"):
        m.generate([-1, 2])
    with pytest.raises(ValueError, match="empty"):
        m.generate([])
    with pytest.raises(TypeError):
        m.logits([[1, 2]])


def test_cli_reports_errors_without_traceback(tmp_path, tiny_qrz):
    bad = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(slice(0, 4), b"NOPE"))
    run = subprocess.run([sys.executable, "-m", "pyqrt", "run", bad, "-p", "hi"], capture_output=True, text=True)
    assert run.returncode == 2 and "not a .qrz" in run.stderr and "Traceback" not in run.stderr


# ---- the converter ----
def test_convert_errors(tmp_path):
    with pytest.raises(ConvertError, match="not a directory"):
        convert(tmp_path / "missing", tmp_path / "x.qrz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "x.qrz")
    hf = make_tiny_llama(tmp_path / "hf")
    with pytest.raises(ConvertError, match="unknown format"):
        convert(hf, tmp_path / "x.qrz", fmt="q3")
    with pytest.raises(ConvertError, match="group size 24 does not divide"):
        convert(hf, tmp_path / "x.qrz", fmt="q8", group_size=24)
    with pytest.raises(ConvertError, match="cannot write"):
        convert(hf, tmp_path / "nodir" / "x.qrz")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    json.dump(dict(cfg, architectures=["MambaForCausalLM"], model_type="mamba"), open(os.path.join(hf, "config.json"), "w"))
    with pytest.raises(ConvertError, match="unsupported architecture MambaForCausalLM"):
        convert(hf, tmp_path / "x.qrz")
    open(os.path.join(hf, "config.json"), "w").write("{not json")
    with pytest.raises(ConvertError, match="not valid JSON"):
        convert(hf, tmp_path / "x.qrz")
    assert not any(p.name.startswith("x.qrz") for p in tmp_path.iterdir())


def test_convert_without_tokenizer(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf")
    os.unlink(os.path.join(hf, "tokenizer.json"))
    with pytest.raises(ConvertError, match="no tokenizer"):
        convert(hf, tmp_path / "x.qrz")


def test_converter_cli_exit_code(tmp_path):
    run = subprocess.run([sys.executable, "-m", "convert", str(tmp_path), str(tmp_path / "x.qrz")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no config.json" in run.stderr and "Traceback" not in run.stderr


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    hf = make_tiny_llama(tmp_path / "hf")
    from convert.formats import q8
    calls = {"n": 0}
    real = q8.quantize

    def failing(w, group):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(w, group)
    monkeypatch.setattr(q8, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(hf, tmp_path / "out.qrz", fmt="q8", group_size=16, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
