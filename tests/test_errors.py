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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_in_child(path, **kw):
    """load in a fresh interpreter; returns (returncode, stderr). A signal shows as a negative return code."""
    code = (f"import pyqrt, sys\ntry:\n    pyqrt.load({path!r}, **{kw!r})\nexcept pyqrt.QrzError as e:\n"
            f"    print(type(e).__name__, e, file=sys.stderr); sys.exit(3)\nexcept OSError as e:\n"
            f"    print(type(e).__name__, e, file=sys.stderr); sys.exit(4)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return run.returncode, run.stderr


def _expect(path, exc_type, fragment, **kw):
    """loading `path` raises exc_type whose message holds fragment (or one of a tuple of them). Tried in a child
    process first, so a crash fails this test (negative return code = the signal) instead of killing pytest."""
    rc, err = _load_in_child(path, **kw)
    assert rc >= 0, f"the process died of signal {-rc} loading a bad file: {err[-2000:]}"
    assert rc in (3, 4), (rc, err[-2000:])
    with pytest.raises(exc_type) as info:
        pyqrt.load(path, **kw)
    fragments = (fragment,) if isinstance(fragment, str) else fragment
    assert any(f.lower() in str(info.value).lower() for f in fragments), str(info.value)


def test_tiny_model_loads_and_runs(tiny_qrz):
    m = pyqrt.load(tiny_qrz, threads=1)
    out = m.generate_tokens([1, 2, 3], max_tokens=5)
    assert len(out) == 5 and all(0 <= t < m.n_vocab for t in out)


def _layout(path):
    """(data_offset, file_size) from the header"""
    with open(path, "rb") as f:
        head = f.read(HEADER)
    return struct.unpack_from("<Q", head, 32)[0], struct.unpack_from("<Q", head, 40)[0]


# where to cut, as a function of (data_offset, file_size): inside the header, the metadata, the tensor data
CUTS = {
    "empty": lambda off, size: 0,
    "in-magic": lambda off, size: 3,
    "mid-header": lambda off, size: 20,
    "header-minus-1": lambda off, size: HEADER - 1,
    "header-only": lambda off, size: HEADER,
    "mid-metadata": lambda off, size: (HEADER + off) // 2,
    "before-data": lambda off, size: off,
    "mid-data": lambda off, size: (off + size) // 2,
    "last-byte": lambda off, size: size - 1,
}


@pytest.mark.parametrize("where", CUTS)
def test_truncated_file(tmp_path, tiny_qrz, where):
    keep = CUTS[where](*_layout(tiny_qrz))
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__delitem__(slice(keep, None)))
    _expect(path, pyqrt.FormatError, "truncated")


@pytest.mark.parametrize("where", ["mid-metadata", "before-data"])
def test_truncated_file_with_consistent_header(tmp_path, tiny_qrz, where):
    """a cut whose header was patched to agree with the new size (and the metadata CRC fixed): the parser's own
    bounds checks, not the file-size check, must catch it"""
    off, size = _layout(tiny_qrz)
    keep = CUTS[where](off, size)

    def cut(d):
        del d[keep:]
        struct.pack_into("<Q", d, 40, keep)               # file_size
        struct.pack_into("<Q", d, 32, keep // 64 * 64)   # data_offset, still a multiple of 64
        _fix_meta_crc(d)
    _expect(_patched(tmp_path, tiny_qrz, cut), pyqrt.FormatError, ("corrupt", "truncated"))


def test_file_size_beyond_end_and_data_offset_beyond_end(tmp_path, tiny_qrz):
    off, size = _layout(tiny_qrz)
    _expect(_patched(tmp_path, tiny_qrz, lambda d: struct.pack_into("<Q", d, 32, size + 64), "doff.qrz"),
            pyqrt.FormatError, "corrupt")
    _expect(_patched(tmp_path, tiny_qrz, lambda d: struct.pack_into("<Q", d, 32, off + 1), "align.qrz"),
            pyqrt.FormatError, "corrupt")


def test_wrong_magic(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(slice(0, 4), b"NOPE"))
    _expect(path, pyqrt.FormatError, "not a .qrz")


def test_gguf_file_is_recognized(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(slice(0, 4), b"GGUF"))
    _expect(path, pyqrt.FormatError, "python -m convert")


@pytest.mark.parametrize("version", [0, 2, 7, 2**32 - 1])
def test_wrong_version(tmp_path, tiny_qrz, version):
    def patch(d):
        struct.pack_into("<I", d, 8, version)
        _fix_meta_crc(d)   # the version lies outside the CRC's range anyway: the version check is what fires
    path = _patched(tmp_path, tiny_qrz, patch)
    _expect(path, pyqrt.FormatError, f"version {version}")


def test_big_endian_marker(tmp_path, tiny_qrz):
    path = _patched(tmp_path, tiny_qrz, lambda d: struct.pack_into(">I", d, 4, 0x0A0B0C0D))
    _expect(path, pyqrt.FormatError, "big-endian")


@pytest.mark.parametrize("where", ["first-key", "mid-metadata", "last-metadata-byte"])
def test_corrupt_metadata_fails_checksum(tmp_path, tiny_qrz, where):
    off, _ = _layout(tiny_qrz)
    at = {"first-key": HEADER + 9, "mid-metadata": (HEADER + off) // 2, "last-metadata-byte": off - 1}[where]
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(at, d[at] ^ 0x40))
    _expect(path, pyqrt.FormatError, "checksum")


@pytest.mark.parametrize("where", ["first-tensor-byte", "mid-data", "last-byte"])
def test_corrupt_tensor_data_fails_checksum(tmp_path, tiny_qrz, where):
    off, size = _layout(tiny_qrz)
    at = {"first-tensor-byte": off, "mid-data": (off + size) // 2, "last-byte": size - 1}[where]
    tensors = pyqrt.open_file(tiny_qrz).tensors
    assert any(t["offset"] <= at < t["offset"] + t["nbytes"] for t in tensors), "the byte must lie in a tensor"
    path = _patched(tmp_path, tiny_qrz, lambda d: d.__setitem__(at, d[at] ^ 0x01))
    _expect(path, pyqrt.FormatError, "checksum", verify=True)
    _expect(path, pyqrt.FormatError, "checksum")           # verify=True is the default
    for mmap in (True, False):                             # checked through the mapping and in the copy alike
        _expect(path, pyqrt.FormatError, "checksum", mmap=mmap)
    pyqrt.load(path, verify=False)   # the caller may skip the data checksums; the structure is still sound


@pytest.fixture(scope="module")
def wide_vocab_qrz(tmp_path_factory):
    """a tiny model whose token embedding spans many pages beside its own output head (a copy leaves it mapped)"""
    d = tmp_path_factory.mktemp("wide")
    hf = make_tiny_llama(d / "hf", vocab=2048)
    return str(convert(hf, d / "wide-q8.qrz", fmt="q8", group_size=16, progress=False))


def test_copied_and_mapped_weights_run_alike(wide_vocab_qrz):
    """mmap=True (the file mapped), False (read into memory, the embedding's pages left mapped) and None (the
    default's choice) give the same logits"""
    ids = list(range(3, 2048, 97))
    want = pyqrt.load(wide_vocab_qrz, threads=1, mmap=True).logits(ids)
    for mmap in (False, None):
        np.testing.assert_array_equal(pyqrt.load(wide_vocab_qrz, threads=1, mmap=mmap).logits(ids), want)
    with pytest.raises(ValueError, match="mmap must be"):
        pyqrt.load(wide_vocab_qrz, mmap="yes")


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight"])
def test_copied_weights_fail_their_checksum(tmp_path, wide_vocab_qrz, tensor):
    """a flipped byte in the middle of the embedding (left mapped by a copy) or of the head (copied) is caught"""
    t = next(t for t in pyqrt.open_file(wide_vocab_qrz).tensors if t["name"] == tensor)
    at = t["offset"] + t["nbytes"] // 2
    path = _patched(tmp_path, wide_vocab_qrz, lambda d: d.__setitem__(at, d[at] ^ 0x01))
    for mmap in (True, False):
        _expect(path, pyqrt.FormatError, "checksum", mmap=mmap)


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


_TYPE_IDS = {"f32": 0, "f16": 1, "q8": 2, "sdr": 3, "int4": 4, "fp4": 5, "sq": 6}
_I32_KEYS = {"tokenizer.bos_id", "tokenizer.eos_id", "tokenizer.pad_id"}
_I32_ARRAYS = {"tokenizer.token_type", "tokenizer.eog_ids"}


def _rewrite(src, dst, edit_metadata=None, keep_tensor=lambda name: True, edit_tensor=None):
    """a new .qrz written by the converter's own writer from src's metadata and tensors, after edits: a file
    that is well-formed (sizes, CRCs) but describes something the runtime must refuse. edit_tensor(name,
    bytearray) may change a tensor's bytes in place."""
    from convert.qrzfile import ARRAY, I32, KV, QrzWriter, TensorSpec
    f = pyqrt.open_file(src)
    meta = dict(f.metadata)
    for k in _I32_KEYS & set(meta):
        meta[k] = KV(I32, meta[k])
    for k in _I32_ARRAYS & set(meta):
        meta[k] = KV(ARRAY, list(meta[k]), I32)
    if edit_metadata:
        edit_metadata(meta)
    tensors = [t for t in f.tensors if keep_tensor(t["name"])]
    specs = [TensorSpec(t["name"], _TYPE_IDS[t["type"]], t["shape"], t["group_size"], t["nbytes"]) for t in tensors]
    raw = open(src, "rb").read()
    with QrzWriter(str(dst), meta, specs) as w:
        for t in tensors:
            data = bytearray(raw[t["offset"]:t["offset"] + t["nbytes"]])
            if edit_tensor:
                edit_tensor(t["name"], data)
            w.write_tensor(t["name"], np.frombuffer(bytes(data), np.uint8))
    return str(dst)


def test_rewritten_file_still_loads(tmp_path, tiny_qrz):
    """the rewriting helper itself is faithful: an unedited copy loads and computes the same logits"""
    copy = _rewrite(tiny_qrz, tmp_path / "copy.qrz")
    a, b = pyqrt.load(tiny_qrz, threads=1), pyqrt.load(copy, threads=1)
    assert np.array_equal(a.logits([1, 2, 3]), b.logits([1, 2, 3]))


@pytest.mark.parametrize("arch", ["qwen3moe", "mamba2", ""])
def test_unsupported_architecture_written_by_the_writer(tmp_path, tiny_qrz, arch):
    path = _rewrite(tiny_qrz, tmp_path / "arch.qrz", lambda m: m.__setitem__("general.architecture", arch))
    _expect(path, pyqrt.ArchitectureError, f"architecture '{arch}'")


@pytest.mark.parametrize("shift", [4, 5, 15])
def test_sdr_shift_out_of_range_is_refused(tmp_path, shift):
    """a file with valid checksums whose SDR shifts exceed 4 would overflow the kernels' int32 sums: refused at
    load (4 is the largest an int8 base produces, and loads)"""
    from convert.formats import sdr
    hf = make_tiny_llama(tmp_path / "hf")
    src = str(convert(hf, tmp_path / "sdr.qrz", fmt="sdr", group_size=16, progress=False))
    name = "model.layers.1.mlp.down_proj.weight"
    f = pyqrt.open_file(src)
    t = next(t for t in f.tensors if t["name"] == name)
    rows = t["shape"][0]

    def edit(tname, data):
        if tname == name:                    # row 2, group 1: the high nibble of the row's first shift byte
            off = sdr.align64(rows * 4) + 2 * sdr._flag_bytes(t["shape"][1], 16)
            data[off] = (data[off] & 0x0F) | (shift << 4)
    path = _rewrite(src, tmp_path / "shift.qrz", edit_tensor=edit)
    if shift <= 4:
        pyqrt.load(path).logits([1, 2, 3])
    else:
        _expect(path, pyqrt.FormatError, (name, "shift above 4"))


@pytest.mark.parametrize("at,value,why", [(None, None, None), (0, 0, "FP4 layout"), (1, 4, "FP4 layout"),
                                         (2, 7, "scale mode"), ("scale", -1.0, "activation scale"),
                                         ("shift", 4, "activation offset")])
def test_fp4_header_out_of_range_is_refused(tmp_path, at, value, why):
    """a file with valid checksums whose FP4 header names no layout, no scale mode, a scale that is not positive,
    or an activation offset its layout's int8 lanes cannot hold is refused at load; the unedited file loads"""
    from convert.formats import fp4
    hf = make_tiny_llama(tmp_path / "hf")
    src = str(convert(hf, tmp_path / "fp4.qrz", fmt="fp4", group_size=32, progress=False))
    name = "model.layers.1.self_attn.o_proj.weight"

    def edit(tname, data):
        if tname != name or at is None:
            return
        if at == "scale":
            data[4:8] = struct.pack("<f", value)
        elif at == "shift":                  # input channel 5 of a tensor whose activations are E2M1 (K = 3)
            data[fp4.HEADER_BYTES + 5] = value
        else:
            data[at] = value
    path = _rewrite(src, tmp_path / "edited.qrz", edit_tensor=edit)
    if at is None:
        pyqrt.load(path, act="4bit").logits([1, 2, 3])
    else:
        _expect(path, pyqrt.FormatError, (name, why))


@pytest.mark.parametrize("at,why", [(None, None), ("k", "bytes recorded"), ("hot", "hot-channel flag"),
                                    ("count", "hot-channel count"), ("old", "slot layout of earlier converters"),
                                    ("layout", "slot layout other"), ("clip", "activation clipping")])
def test_sq_header_and_slots_out_of_range_are_refused(tmp_path, at, why):
    """a file with valid checksums whose SQ header claims another slot count (so its size disagrees), the slot
    layout of earlier converters (or an unknown one), or whose hot plane, hot count or clipping leave the format's
    ranges, is refused at load; the unedited file loads. (At group 32 every 5-bit slot position is inside the
    group; positions past a group of 96 are refused in tests/test_sq.py.)"""
    from convert.formats import sq
    hf = make_tiny_llama(tmp_path / "hf")
    calib = tmp_path / "calib.txt"
    calib.write_text("a quiet river runs under old stone bridges. " * 60, encoding="utf-8")
    src = str(convert(hf, tmp_path / "sq.qrz", fmt="sq", group_size=32, progress=False, calib=str(calib),
                      calib_tokens=256))
    name = "model.layers.1.self_attn.o_proj.weight"
    t = next(t for t in pyqrt.open_file(src).tensors if t["name"] == name)

    def edit(tname, data):
        if tname != name or at is None:
            return
        if at == "k":
            data[0] += 1
        elif at == "hot":
            data[sq.HEADER_BYTES + 3] = 2
        elif at == "count":
            data[4] ^= 1
        elif at == "old":
            data[12:14] = struct.pack("<H", 0)
        elif at == "layout":
            data[12:14] = struct.pack("<H", 2)
        else:
            data[8:12] = struct.pack("<f", 1.25)
    path = _rewrite(src, tmp_path / "edited.qrz", edit_tensor=edit)
    if at is None:
        pyqrt.load(path, act="4bit").logits([1, 2, 3])
    else:
        _expect(path, pyqrt.FormatError, (name, why))


def test_missing_tensor(tmp_path, tiny_qrz):
    gone = "model.layers.1.mlp.down_proj.weight"
    path = _rewrite(tiny_qrz, tmp_path / "missing.qrz", keep_tensor=lambda name: name != gone)
    _expect(path, pyqrt.ArchitectureError, gone)


def test_ill_shaped_tensor(tmp_path, tiny_qrz):
    path = _rewrite(tiny_qrz, tmp_path / "shape.qrz", lambda m: m.__setitem__("model.n_ff", m["model.n_ff"] * 2))
    _expect(path, pyqrt.ArchitectureError, "shape")


def test_missing_hyperparameter(tmp_path, tiny_qrz):
    path = _rewrite(tiny_qrz, tmp_path / "nohp.qrz", lambda m: m.pop("model.n_heads"))
    _expect(path, (pyqrt.ArchitectureError, pyqrt.FormatError), "model.n_heads")


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
    text = "The quick brown fox jumps over the lazy dog. " * 20
    n = len(m.tokenize(text))
    assert n > 64
    with pytest.raises(pyqrt.ContextOverflowError) as info:
        m.generate(text, max_tokens=4)
    assert f"{n} tokens" in str(info.value) and "64" in str(info.value) and "ctx=" in str(info.value)
    with pytest.raises(pyqrt.ContextOverflowError, match="ctx="):
        m.chat([{"role": "user", "content": text}], max_tokens=4)
    with pytest.raises(pyqrt.ContextOverflowError, match="ctx="):
        list(m.generate(text, max_tokens=4, stream=True))
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
