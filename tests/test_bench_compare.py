"""The pure-Python parts of bench/compare.py and the read loop of bench/bandwidth.py, on synthetic numbers and tiny
files: no real model, no download, no llama.cpp (the one test about llama-cpp-python skips without it)."""
import json

import numpy as np
import pytest

from bench import bandwidth, compare
from tests import tiny


# ---- bytes read per token ----

def test_bytes_per_token_reads_one_embedding_row_beside_a_head_and_all_of_a_tied_one():
    layers = {"w1": (600, 3), "w2": (400, 2)}
    untied = dict(layers, emb=(1000, 10), head=(700, 10))
    assert compare.bytes_per_token(untied, "emb", "head") == 600 + 400 + 700 + 100
    tied = dict(layers, emb=(1000, 10))
    assert compare.bytes_per_token(tied, "emb", "head") == 600 + 400 + 1000
    with pytest.raises(ValueError):
        compare.bytes_per_token(layers, "emb", "head")


def _pad64(n):
    return (n + 63) // 64 * 64


def _q8_bytes(rows, cols, group=32):
    """docs/FORMAT.md's Q8: f16 scale plane padded to 64 bytes, then one int8 per weight"""
    return _pad64(rows * (cols // group) * 2) + rows * cols


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory):
    """a tiny Llama (make_tiny_llama's default shapes) converted to q8 twice: with its own head and tied"""
    from convert import convert
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for tied in (False, True):
        src = tiny.make_tiny_llama(str(root / f"hf-{tied}"))
        if tied:
            tiny.edit_config(src, {"tie_word_embeddings": True})
        out[tied] = str(root / f"tiny-{tied}.qrz")
        convert(src, out[tied], fmt="q8", group_size=32, progress=False)
    return out


def test_qrz_bytes_per_token_matches_the_format_arithmetic(tiny_q8):
    import pyqrt
    vocab = pyqrt.open_file(tiny_q8[False]).metadata["model.n_vocab"]
    hidden, q, kv, ff, layers = 64, 64, 32, 96, 2    # make_tiny_llama's defaults: 4 heads, 2 KV heads of 16
    per_layer = (_q8_bytes(q, hidden) + 2 * _q8_bytes(kv, hidden) + _q8_bytes(hidden, q)
                 + 2 * _q8_bytes(ff, hidden) + _q8_bytes(hidden, ff) + 2 * hidden * 4)   # + two f32 norms
    embedding = _q8_bytes(vocab, hidden)
    body = layers * per_layer + hidden * 4                                                 # + the final norm
    assert compare.qrz_bytes_per_token(tiny_q8[False]) == pytest.approx(body + embedding + embedding / vocab)
    assert compare.qrz_bytes_per_token(tiny_q8[True]) == pytest.approx(body + embedding)


def test_gguf_bytes_per_token_reads_rows_in_ggml_order(tmp_path):
    gguf = pytest.importorskip("gguf")
    paths = {}
    for tied in (False, True):
        paths[tied] = str(tmp_path / f"m-{tied}.gguf")
        w = gguf.GGUFWriter(paths[tied], "llama")
        w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))      # 8 rows of 4: 128 bytes
        w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))    # 64 bytes
        if not tied:
            w.add_tensor("output.weight", np.ones((8, 4), np.float16))      # 64 bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    assert compare.gguf_bytes_per_token(paths[False]) == 64 + 64 + 128 / 8
    assert compare.gguf_bytes_per_token(paths[True]) == 64 + 128
    assert compare.gguf_tensor_types(paths[False]) == {"F32": 2, "F16": 1}


# ---- labels, schedule, settings ----

def test_pyqrt_labels():
    assert compare.pyqrt_label("sdr", "4bit") == "sdr W4A4"
    assert compare.pyqrt_label("fp4", "8bit") == "fp4 W4A8"
    assert compare.pyqrt_label("sq", None) == "sq W4A8"      # the 4-bit formats' default activations are 8-bit
    assert compare.pyqrt_label("q8", None) == "q8 W8A8"
    assert compare.pyqrt_label("f16", None) == "f16"
    assert compare.pyqrt_label("fp4", "8bit", 64) == "fp4@64 W4A8"      # a group other than Q4_0's is named
    assert compare.pyqrt_label("sdr", "4bit", 32) == "sdr W4A4"


def test_format_group_suffix():
    assert compare.split_group("fp4@64") == ("fp4", 64)
    assert compare.split_group("sdr") == ("sdr", compare.DEFAULT_GROUP)
    for bad in ("fp4@", "fp4@x", "fp4@0", "fp4@-2"):
        with pytest.raises(ValueError):
            compare.split_group(bad)


def test_schedule_runs_every_entry_once_per_round_and_rotates_the_start():
    entries = ["a", "b", "c"]
    rounds = compare.schedule(entries, 4)
    assert len(rounds) == 4
    assert all(sorted(r) == entries for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a"]
    assert compare.schedule([], 3) == []


def test_quick_sets_small_defaults_that_explicit_options_override():
    quick = compare.parse_args(["--quick", "--model", "smollm2"])
    assert (quick.runs, quick.pp, quick.tg, quick.bandwidth_mib) == (2, 64, 16, 256)
    assert quick.threads == 2 and quick.format == compare.PYQRT_FORMATS and quick.llama_type == ["Q4_0", "IQ4_NL", "Q8_0"]
    mixed = compare.parse_args(["--quick", "--runs", "7", "--pp", "128"])
    assert (mixed.runs, mixed.pp, mixed.tg) == (7, 128, 16)
    assert mixed.model == ["smollm2", "qwen25"]
    full = compare.parse_args([])
    assert (full.runs, full.pp, full.tg, full.bandwidth_mib) == (5, 512, 128, 1024)
    assert compare.parse_args(["--format", "fp4@64:8bit"]).format == ["fp4@64:8bit"]
    for bad in (["--model", "nope"], ["--format", "q5"], ["--format", "fp4@x"], ["--format", "q5@64"], ["--runs", "0"],
                ["--pp", "8"]):
        with pytest.raises(SystemExit):
            compare.parse_args(bad)


# ---- results: medians, ratios, roofline, table ----

def _entry(engine, fmt, model, bpt):
    return {"engine": engine, "format": fmt, "model": model, "path": "/x", "bytes_per_token": bpt}


def _run(pp, tg, rss_mib=100, load=0.5):
    return {"pp": [pp], "tg": [tg], "load_s": [load], "rss_bytes": rss_mib * 2**20, "rss_base_bytes": 30 * 2**20}


def _synthetic():
    entries = [_entry("pyqrt", "sdr W4A8", "m1", 50e6), _entry("llama.cpp", "Q4_0", "m1", 80e6),
               _entry("pyqrt", "q8 W8A8", "m2", 100e6)]          # m2 has no llama.cpp baseline
    results = {}
    for e, runs in zip(entries, ([(300, 90), (100, 110), (200, 100)], [(100, 40), (120, 50), (80, 60)],
                                 [(10, 5), (30, 7), (20, 6)])):
        for pp, tg in runs:
            results[compare.entry_key(e)] = compare.merge_run(results.get(compare.entry_key(e)), _run(pp, tg))
    return entries, results


def test_merge_run_keeps_every_run_and_the_peak_rss():
    a = compare.merge_run(None, _run(1, 2, rss_mib=100, load=0.3))
    b = compare.merge_run(a, _run(3, 4, rss_mib=80, load=0.2))
    assert b["pp"] == [1, 3] and b["tg"] == [2, 4] and b["load_s"] == [0.3, 0.2]
    assert b["rss_bytes"] == 100 * 2**20
    assert a["pp"] == [1]       # the accumulated answer is not changed in place


def test_summarize_medians_ratios_and_roofline():
    entries, results = _synthetic()
    rows = compare.summarize(entries, results, bandwidth_gbps=[9.0, 10.0, 30.0])   # median 10 GB/s
    sdr, q4, q8 = rows
    assert (sdr["pp"], sdr["pp_min"], sdr["pp_max"]) == (200, 100, 300)
    assert (sdr["tg"], sdr["tg_min"], sdr["tg_max"], sdr["n_runs"]) == (100, 90, 110, 3)
    assert sdr["pp_ratio"] == pytest.approx(200 / 100) and sdr["tg_ratio"] == pytest.approx(100 / 50)
    assert q4["pp_ratio"] == pytest.approx(1.0) and q4["tg_ratio"] == pytest.approx(1.0)
    assert sdr["roofline_tg"] == pytest.approx(10e9 / 50e6)                  # 200 tokens/s
    assert sdr["roofline_fraction"] == pytest.approx(100 / 200)
    assert q4["roofline_tg"] == pytest.approx(125) and q4["roofline_fraction"] == pytest.approx(50 / 125)
    assert q8["pp_ratio"] is None and q8["tg_ratio"] is None                 # no Q4_0 of m2 to compare with
    assert q8["roofline_fraction"] == pytest.approx(6 / 100)
    assert compare.summarize(entries, results, [])[0]["roofline_tg"] is None


def test_roofline_fraction_takes_each_round_against_its_own_bandwidth():
    entries, _ = _synthetic()
    e = entries[0]                                                   # 50 MB read a token
    r = compare.merge_run(compare.merge_run(None, _run(1, 100), 10.0), _run(1, 110), 30.0)
    assert r["tg_gbps"] == [10.0, 30.0]
    row = compare.summarize([e], {compare.entry_key(e): r}, bandwidth_gbps=[10.0, 30.0])[0]
    assert row["roofline_tg"] == pytest.approx(20e9 / 50e6)           # the median bandwidth's bound, 400
    # 100 of 200 in the slow round, 110 of 600 in the fast one; not 105 of 400
    assert row["roofline_fraction"] == pytest.approx((100 / 200 + 110 / 600) / 2)


def test_summarize_keeps_failed_entries_and_their_ratio_partners_drop_out():
    entries, results = _synthetic()
    results[("llama.cpp", "Q4_0", "m1")] = {"error": "llama_decode returned -1"}
    rows = compare.summarize(entries, results, [10.0])
    assert rows[1]["error"] == "llama_decode returned -1"
    assert rows[0]["tg_ratio"] is None


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_markdown_table_rows_and_cells():
    entries, results = _synthetic()
    results[("pyqrt", "q8 W8A8", "m2")] = {"error": "RuntimeError: boom\nlast line"}
    table = compare.markdown_table(compare.summarize(entries, results, [10.0]))
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert _cells(lines[0]) == compare.TABLE_COLUMNS
    sdr = dict(zip(compare.TABLE_COLUMNS, _cells(lines[2])))
    assert sdr["pp t/s"] == "200.0 (100.0-300.0)" and sdr["tg t/s"] == "100.0 (90.0-110.0)"
    assert sdr["pp vs Q4_0"] == "2.00×" and sdr["tg vs Q4_0"] == "2.00×"
    assert sdr["weights read/token MB"] == "50.0" and sdr["tg roofline t/s"] == "200"
    assert sdr["of roofline"] == "50%" and sdr["peak RSS MiB"] == "100" and sdr["load s"] == "0.50"
    failed = _cells(lines[4])
    assert failed[3] == "failed: last line" and len(failed) == len(compare.TABLE_COLUMNS)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    entries, results = _synthetic()
    path = tmp_path / "plot.png"
    compare.plot(compare.summarize(entries, results, [10.0]), str(path), "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    import subprocess
    import sys
    ballast = np.ones(300 << 20, dtype=np.uint8)       # the parent's RSS is now above 300 MiB
    code = "from bench.compare import peak_rss_bytes; print(peak_rss_bytes())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=compare.ROOT, check=True)
    assert int(run.stdout) < 150 << 20, "the child reported its parent's peak (ru_maxrss survives fork and exec)"
    assert ballast[-1] == 1


# ---- the read loop ----

@pytest.mark.parametrize("kernel", ["scalar", "avx2"])
def test_bandwidth_loop_reads_every_word(tmp_path, kernel):
    module = bandwidth.compiled(str(tmp_path))
    ffi, lib = module.ffi, module.lib
    if kernel == "avx2" and not lib.bw_has_avx2():
        pytest.skip("no AVX2 on this CPU")
    size, threads, reps = (1 << 20) + 200, 3, 3      # slices cut to whole 128-byte steps: 349568 bytes each
    buf = lib.bw_alloc(size)
    try:
        words = np.random.default_rng(0).integers(0, 2**63, size // 8, dtype=np.uint64)
        ffi.buffer(buf, size)[:size // 8 * 8] = words.tobytes()
        seconds, checksum = ffi.new("double[]", reps), ffi.new("uint64_t *")
        read = lib.bw_read(buf, size, threads, reps, kernel == "avx2", seconds, checksum)
        assert read == 3 * 349568
        # every pass XORs every word in; an odd number of passes leaves the XOR of all the words read
        assert checksum[0] == int(np.bitwise_xor.reduce(words[:read // 8]))
        assert all(seconds[r] > 0 for r in range(reps))
        assert lib.bw_read(buf, 100, 1, 1, 0, seconds, checksum) == 0          # not even one 128-byte step
    finally:
        lib.bw_free(buf)


def test_bandwidth_measure_reports_decimal_gigabytes_per_second(tmp_path):
    r = bandwidth.measure(1, 4 << 20, runs=2, kernel="scalar", cache_dir=str(tmp_path))
    assert r["bytes"] == 4 << 20 and r["kernel"] == "scalar" and len(r["gbps"]) == 2
    assert all(0.05 < g < 10_000 for g in r["gbps"])
    json.dumps(r)     # compare.py's child hands it over as JSON


# ---- llama-cpp-python, when installed ----

def test_llama_types_are_llama_cpps_ftype_ids():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (bench/compare.py docstring)")
    for name, ftype in compare.LLAMA_TYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}") == ftype
