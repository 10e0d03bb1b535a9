"""The friendly layer: `load` a .qrz and use the `Model` (tokenize, logits, perplexity, generate, chat).

Arguments are validated here, before they reach C; the token loop itself runs in C (`qrz_generate`) with the
GIL released, entering Python only to hand over finished pieces of text.
"""
import math
import os
import queue
import random
import threading

import numpy as np

from . import _native
from ._native import ffi, lib
from .errors import ContextOverflowError, QrzError, TokenizerError

FINISH_REASONS = {lib.QRZ_FINISH_EOG: "stop", lib.QRZ_FINISH_LENGTH: "length", lib.QRZ_FINISH_STOP: "stop",
                  lib.QRZ_FINISH_ABORTED: "aborted", lib.QRZ_FINISH_CONTEXT: "context"}

# the defaults llama.cpp users know
SAMPLING_DEFAULTS = dict(max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                         repeat_last_n=64, seed=None, stop=None, ignore_eos=False)


class QrzFile:
    """An opened .qrz: its metadata and tensor directory. Cheap; runs nothing."""

    def __init__(self, path, verify=True, mmap=True):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such model file: '{path}'")
        if mmap not in (True, False, None):
            raise ValueError(f"mmap must be True (map the file), False (copy it into memory) or None (the faster "
                             f"where the kernel allows), got {mmap!r}")
        self.path = path
        self._handle = _native.model_open(path, verify, mmap)
        self.metadata = _native.model_metadata(self._handle)
        self.tensors = _native.model_tensors(self._handle)
        self.version = lib.qrz_model_version(self._handle)
        self.file_size = lib.qrz_model_file_size(self._handle)


def open_file(path, verify=True):
    """Open a .qrz for inspection (metadata and tensors) without creating an inference context."""
    return QrzFile(path, verify)


def _int_arg(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _float_arg(name, value, lo, hi, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def scoring_windows(ids, window, bos=None):
    """The non-overlapping windows perplexity scores, each as a fresh sequence. With bos (a model whose tokenizer
    starts every text with BOS): [bos] and the next window - 1 tokens, so every token is predicted. Without: window
    tokens, the first only context. A window of fewer than 2 tokens is dropped. Either way a window predicts
    window - 1 tokens. A model trained always behind BOS is off its distribution without it: Gemma-3-270M's float
    model predicts the first 16 tokens of a BOS-less window worse than a uniform guess, and the noise of any
    quantization then scores better than the float model there."""
    step = window - 1 if bos is not None else window
    out = []
    for start in range(0, len(ids), step):
        chunk = ([bos] if bos is not None else []) + [int(i) for i in ids[start:start + step]]
        if len(chunk) < 2:
            break
        out.append(chunk)
    return out


class _PieceSink:
    """Receives text pieces from the C loop; a handle to it travels through C as the callback's user pointer."""

    def __init__(self, on_piece):
        self.on_piece = on_piece
        self.error = None
        self.abort = False


@ffi.def_extern()
def pyqrt_on_piece(user, piece, length):
    sink = ffi.from_handle(user)
    if sink.abort:
        return 1
    try:
        sink.on_piece(ffi.unpack(piece, length))
    except BaseException as exc:  # surfaced after the C call returns; stop generating now
        sink.error = exc
        return 1
    return 1 if sink.abort else 0


class _InputStats:
    """Per matmul, keyed by tensor index (the matmul hook's user pointer): sums of x^2 per input column, or with
    gram=True sums of x x^T (float32, cols x cols), and the number of rows seen; with samples > 0 also the max |x|
    per column and up to `samples` input rows drawn at random (a fixed seed) from everything seen."""

    def __init__(self, gram=False, samples=0):
        self.gram, self.sums, self.rows, self.error = gram, {}, {}, None
        self.samples, self.absmax, self.picked = samples, {}, {}
        self.rng = np.random.default_rng(0)
        self.last_x = self.last_sum = None     # q, k and v (gate and up) read the same input: one product

    def add_samples(self, tensor, rows):
        if tensor in self.absmax:
            np.maximum(self.absmax[tensor], np.abs(rows).max(axis=0), out=self.absmax[tensor])
        else:
            self.absmax[tensor] = np.abs(rows).max(axis=0)
        # reservoir sampling: every row seen so far is equally likely to be among those kept
        kept = self.picked.setdefault(tensor, [])
        seen = self.rows.get(tensor, 0)
        for j in range(rows.shape[0]):
            if len(kept) < self.samples:
                kept.append(rows[j].copy())
            else:
                slot = int(self.rng.integers(0, seen + j + 1))
                if slot < self.samples:
                    kept[slot] = rows[j].copy()


# An exception that leaves the hook before its own `try` (a signal handler's SystemExit or KeyboardInterrupt runs
# at the function's first instruction) would be printed and dropped by cffi; the onerror handler keeps it instead,
# for input_statistics to raise after the window, as it does the hook's own errors.
_HOOK_ESCAPED = []


def _hook_escaped(exc_type, exc_value, traceback):
    _HOOK_ESCAPED.append(exc_value)


def _hook_stats(user):
    return ffi.from_handle(user)


@ffi.def_extern(onerror=_hook_escaped)
def pyqrt_on_matmul(user, tensor, x, n, cols):
    stats = _hook_stats(user)
    try:
        rows = np.frombuffer(ffi.buffer(x, n * cols * 4), dtype=np.float32).reshape(n, cols)
        if stats.gram:
            if stats.last_x is None or stats.last_x.shape != rows.shape or not np.array_equal(stats.last_x, rows):
                stats.last_x, stats.last_sum = rows.copy(), rows.T @ rows
            add = stats.last_sum
        else:
            r64 = rows.astype(np.float64)
            add = (r64 * r64).sum(axis=0)
        if stats.samples:
            stats.add_samples(tensor, rows)
        if tensor in stats.sums:
            stats.sums[tensor] += add
        else:
            stats.sums[tensor] = add.copy()
        stats.rows[tensor] = stats.rows.get(tensor, 0) + n
    except BaseException as exc:   # raised after the C call returns
        stats.error = exc


# weight formats whose kernels take 4-bit activations (act="4bit")
FOUR_BIT_ACT_FORMATS = {"sdr", "int4", "fp4", "sq"}


class Model:
    """A loaded model with its inference context (KV cache, threads). Not safe to share between threads
    without your own lock; a single call is serialized internally."""

    def __init__(self, path, threads=None, ctx=None, batch=None, verify=True, isa=None, act=None, kv="f32",
                 mmap=None):
        threads = _int_arg("threads", threads, 1, allow_none=True)
        ctx = _int_arg("ctx", ctx, 1, allow_none=True)
        batch = _int_arg("batch", batch, 1, allow_none=True)
        if isa is not None and isa not in _native.ISA_NAMES:
            raise ValueError(f"isa must be one of {sorted(_native.ISA_NAMES)} or None, got {isa!r}")
        if act not in (None, "8bit", "4bit"):
            raise ValueError(f"act must be '8bit', '4bit' or None (the format's default, 8-bit), got {act!r}")
        if kv not in _native.KV_CACHE_TYPES:
            raise ValueError(f"kv must be one of {', '.join(repr(k) for k in _native.KV_CACHE_TYPES)}, got {kv!r}")
        self.file = QrzFile(path, verify, mmap)
        self.metadata = self.file.metadata
        self.path = self.file.path
        fmt = self.metadata.get("quant.format")
        if act == "4bit" and fmt not in FOUR_BIT_ACT_FORMATS:
            raise ValueError(f"act='4bit' needs a weight format with 4-bit activation kernels "
                             f"({', '.join(sorted(FOUR_BIT_ACT_FORMATS))}); this file is '{fmt}'. Convert with "
                             f"--format sdr (or fp4, sq, int4), or load with act='8bit'")
        self.act = act or ("8bit" if fmt not in ("f32", "f16") else "float")
        self.kv = kv
        self._ctx = _native.context_new(self.file._handle, ctx or 0, threads or 0, batch or 0,
                                        _native.ISA_NAMES[isa] if isa else lib.QRZ_ISA_BEST,
                                        4 if act == "4bit" else 8, _native.KV_CACHE_TYPES[kv])
        self.n_ctx = lib.qrz_context_n_ctx(self._ctx)
        self.n_vocab = lib.qrz_context_n_vocab(self._ctx)
        self.n_threads = lib.qrz_context_n_threads(self._ctx)
        self.isa = isa or _native.isa_default()
        self._tokenizer = None
        self._lock = threading.Lock()
        self.last_timings = {}

    # ---- tokens ----
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_metadata(self.metadata)
        return self._tokenizer

    def tokenize(self, text, special=True):
        """Text to ids. special=True applies the model's own BOS/EOS policy (transformers' add_special_tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids):
        return self.tokenizer.decode(self._check_ids(ids, "ids", allow_empty=True).tolist())

    def _check_ids(self, ids, name="ids", allow_empty=False):
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{name} must be a 1-D sequence of integer token ids")
        if not allow_empty and arr.size == 0:
            raise ValueError(f"{name} is empty")
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_vocab):
            raise ValueError(f"{name} holds a token id outside [0, {self.n_vocab})")
        return np.ascontiguousarray(arr, dtype=np.int32)

    # ---- scoring ----
    def logits(self, ids):
        """Logits of every position of a fresh sequence: array (len(ids), n_vocab), float32."""
        tokens = self._check_ids(ids)
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit in the context of {self.n_ctx}; "
                                       f"load the model with ctx={len(tokens)} or more")
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        with self._lock:
            lib.qrz_context_reset(self._ctx)
            _native.context_check(self._ctx, lib.qrz_eval(self._ctx, _native.as_c_array(tokens, np.int32), len(tokens),
                                                          _native.as_c_array(out, np.float32), 1))
        return out

    def score(self, ids):
        """Negative log-likelihood of each token after the first, for a fresh sequence (float64, len(ids)-1)."""
        tokens = self._check_ids(ids)
        if len(tokens) < 2:
            raise ValueError("score needs at least 2 tokens")
        if len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit in the context of {self.n_ctx}; "
                                       f"load the model with ctx={len(tokens)} or more")
        nll = np.empty(len(tokens) - 1, dtype=np.float64)
        with self._lock:
            _native.context_check(self._ctx, lib.qrz_score(self._ctx, _native.as_c_array(tokens, np.int32), len(tokens),
                                                           _native.as_c_array(nll, np.float64)))
        return nll

    def input_statistics(self, text_or_ids, window=512, max_tokens=None, gram=False, samples=0):
        """Calibration: {weight name: mean of x^2 per input column (float64)} over every matmul input while the
        text is scored in the windows perplexity scores (scoring_windows: each window's last token is only a
        target, never an input); gram=True: the mean of x x^T instead ((cols, cols) float32). The converter
        rounds weights against it. samples > 0: {name: (that, max |x| per column, up to `samples` input rows
        (n, cols) float32 drawn uniformly from all of them)} instead."""
        window = _int_arg("window", window, 2)
        ids = self.tokenize(text_or_ids, special=False) if isinstance(text_or_ids, str) else list(text_or_ids)
        if max_tokens is not None:
            ids = ids[:_int_arg("max_tokens", max_tokens, 2)]
        stats = _InputStats(gram=bool(gram), samples=_int_arg("samples", samples, 0))
        handle = ffi.new_handle(stats)
        _HOOK_ESCAPED.clear()
        lib.qrz_context_set_matmul_hook(self._ctx, lib.pyqrt_on_matmul, handle)
        try:
            for chunk in self.scoring_windows(ids, window):
                self.score(chunk)
                if stats.error is None and _HOOK_ESCAPED:
                    stats.error = _HOOK_ESCAPED[0]
                if stats.error is not None:
                    raise stats.error
        finally:
            lib.qrz_context_set_matmul_hook(self._ctx, ffi.NULL, ffi.NULL)
        names = [t["name"] for t in self.file.tensors]
        if stats.samples:
            return {names[i]: (stats.sums[i] / stats.rows[i], stats.absmax[i], np.stack(stats.picked[i]))
                    for i in stats.sums}
        return {names[i]: stats.sums[i] / stats.rows[i] for i in stats.sums}

    @property
    def scoring_bos(self):
        """the token every scored window starts with: BOS when the model's tokenizer adds one, else None"""
        tok = self.tokenizer
        return tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None

    def scoring_windows(self, ids, window):
        """the windows perplexity scores ids in (the module's scoring_windows, behind scoring_bos)"""
        return scoring_windows(ids, window, self.scoring_bos)

    def perplexity(self, text_or_ids, window=512, max_tokens=None):
        """exp(mean NLL) over non-overlapping windows, each scored as a fresh sequence (scoring_windows: behind
        BOS when the model's tokenizer adds one, else its first token is context only). Text is tokenized without
        BOS."""
        window = _int_arg("window", window, 2)
        ids = self.tokenize(text_or_ids, special=False) if isinstance(text_or_ids, str) else list(text_or_ids)
        if max_tokens is not None:
            ids = ids[:_int_arg("max_tokens", max_tokens, 2)]
        total, count = 0.0, 0
        for chunk in self.scoring_windows(ids, window):
            nll = self.score(chunk)
            total += float(nll.sum())
            count += len(nll)
        if count == 0:
            raise ValueError("perplexity needs at least 2 tokens")
        return math.exp(total / count)

    # ---- generation ----
    def _sampling(self, kw):
        unknown = set(kw) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(SAMPLING_DEFAULTS)}")
        o = {**SAMPLING_DEFAULTS, **kw}
        o["max_tokens"] = -1 if o["max_tokens"] is None else _int_arg("max_tokens", o["max_tokens"], 0)
        o["temperature"] = _float_arg("temperature", o["temperature"], 0.0, 100.0)
        o["top_k"] = _int_arg("top_k", o["top_k"], 0)
        o["top_p"] = _float_arg("top_p", o["top_p"], 0.0, 1.0, lo_open=True)
        o["min_p"] = _float_arg("min_p", o["min_p"], 0.0, 1.0)
        o["repeat_penalty"] = _float_arg("repeat_penalty", o["repeat_penalty"], 0.0, 100.0, lo_open=True)
        o["repeat_last_n"] = _int_arg("repeat_last_n", o["repeat_last_n"], -1)
        o["seed"] = random.getrandbits(63) if o["seed"] is None else _int_arg("seed", o["seed"], 0)
        stop = o["stop"]
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
            raise TypeError("stop must be a string or a list of strings")
        o["stop"] = [s for s in stop if s]
        o["ignore_eos"] = bool(o["ignore_eos"])
        return o

    def _prompt_ids(self, prompt):
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, special=True)
            if not ids:
                raise ValueError("the prompt is empty and the model adds no BOS token; give some text")
            tokens = np.asarray(ids, dtype=np.int32)
        else:
            tokens = self._check_ids(prompt, "prompt")
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(tokens)} tokens but the context holds {self.n_ctx} "
                                       f"(and needs room to generate); load the model with a larger ctx= "
                                       f"(e.g. ctx={len(tokens) + 256}) or shorten the prompt")
        return tokens

    def _run(self, tokens, o, on_piece):
        """One C call: prompt, sampling loop, stop checks; on_piece(bytes) receives the text."""
        stop_bufs = [ffi.new("char[]", s.encode("utf-8")) for s in o["stop"]]
        stop_arr = ffi.new("const char *[]", stop_bufs) if stop_bufs else ffi.NULL
        params = ffi.new("qrz_sampling_params *", {
            "max_tokens": o["max_tokens"], "temperature": o["temperature"], "top_k": o["top_k"],
            "top_p": o["top_p"], "min_p": o["min_p"], "repeat_penalty": o["repeat_penalty"],
            "repeat_last_n": o["repeat_last_n"], "seed": o["seed"], "ignore_eos": int(o["ignore_eos"]),
            "n_stop": len(stop_bufs), "stop": stop_arr})
        cap = o["max_tokens"] if o["max_tokens"] >= 0 else self.n_ctx
        out_tokens = np.zeros(max(cap, 1), dtype=np.int32)
        result = ffi.new("qrz_generate_result *")
        sink = _PieceSink(on_piece)
        handle = ffi.new_handle(sink)
        with self._lock:
            status = lib.qrz_generate(self._ctx, _native.as_c_array(tokens, np.int32), len(tokens), params,
                                      lib.pyqrt_on_piece, handle, _native.as_c_array(out_tokens, np.int32),
                                      len(out_tokens), result)
        if sink.error is not None:
            raise sink.error
        _native.context_check(self._ctx, status)
        n_gen = min(result.n_generated, len(out_tokens))
        self.last_timings = {"n_prompt": result.n_prompt, "n_reused": result.n_reused,
                             "n_generated": result.n_generated, "prompt_ms": result.prompt_ms,
                             "gen_ms": result.gen_ms, "finish": FINISH_REASONS.get(result.finish, "unknown")}
        return out_tokens[:n_gen].tolist(), sink

    def generate(self, prompt, stream=False, **sampling):
        """Continue `prompt` (text or token ids). Returns the text, or with stream=True an iterator of pieces.
        Stops at the model's end-of-generation tokens unless ignore_eos, at a stop string, or at max_tokens."""
        o = self._sampling(sampling)
        tokens = self._prompt_ids(prompt)
        if stream:
            return self._stream(tokens, o)
        pieces = []
        self._run(tokens, o, pieces.append)
        return b"".join(pieces).decode("utf-8", "replace")

    def generate_tokens(self, prompt, max_tokens=32, temperature=0.0, ignore_eos=True, **sampling):
        """Generated token ids (greedy by default), for exact comparisons and benchmarks."""
        o = self._sampling(dict(sampling, max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos))
        tokens, _ = self._run(self._prompt_ids(prompt), o, lambda piece: None)
        return tokens

    def _stream(self, tokens, o):
        """Runs the C loop on a worker thread and yields its pieces as they arrive; closing the iterator early
        stops the loop at its next piece."""
        pieces = queue.Queue()
        done = object()
        stop_requested = threading.Event()
        state = {}

        def on_piece(piece):
            if stop_requested.is_set():
                raise _Aborted()
            pieces.put(piece)

        def worker():
            try:
                self._run(tokens, o, on_piece)
            except _Aborted:
                pass
            except BaseException as exc:
                state["error"] = exc
            finally:
                pieces.put(done)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                piece = pieces.get()
                if piece is done:
                    break
                # C hands over whole UTF-8 characters only (except at a token that is not valid UTF-8)
                yield piece.decode("utf-8", "replace")
        finally:
            stop_requested.set()
            thread.join()
        if "error" in state:
            raise state["error"]

    # ---- chat ----
    def apply_chat_template(self, messages, add_generation_prompt=True):
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self.tokenizer.chat_template is None:
            raise TokenizerError("this model has no chat template; use generate() with your own prompt format")
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)

    def chat(self, messages, stream=False, **sampling):
        """Reply to a conversation, rendered with the model's own chat template. The KV cache keeps the
        conversation, so a follow-up turn only runs the new tokens."""
        text = self.apply_chat_template(messages)
        ids = self.tokenize(text, special=False)
        return self.generate(ids, stream=stream, **sampling)

    def reset(self):
        with self._lock:
            lib.qrz_context_reset(self._ctx)

    @property
    def n_past(self):
        return lib.qrz_context_n_past(self._ctx)

    @property
    def kv_cache_bytes(self):
        return lib.qrz_context_kv_bytes(self._ctx)

    def __repr__(self):
        return (f"<pyqrt.Model {os.path.basename(self.path)} {self.metadata.get('general.architecture')} "
                f"{self.metadata.get('quant.format')} act={self.act} kv={self.kv} ctx={self.n_ctx} threads={self.n_threads} "
                f"isa={self.isa}>")


class _Aborted(Exception):
    pass


def load(path, threads=None, ctx=None, **options):
    """Load a .qrz. threads: worker threads (default: physical cores); ctx: context length (default: the
    model's); options: batch (prompt tokens per pass), verify (check checksums, default True), isa, act ("8bit" or
    "4bit" activations for the 4-bit weight formats; default 8-bit), kv (KV cache: "f32" default, "f16", "8bit",
    "4bit"), mmap (True: map the file, its pages shared with other processes that load it; False: read it into
    this process's memory in transparent huge pages, which generation streams faster; default None: the copy
    where the kernel gives huge pages (Linux), else the mapping)."""
    known = {"batch", "verify", "isa", "act", "kv", "mmap"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s) for load: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return Model(path, threads=threads, ctx=ctx, **options)
