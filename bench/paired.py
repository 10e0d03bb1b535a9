"""Perplexity differences with their noise: several .qrz files scored on the same wiki tokens, each against a
reference file, token by token.

    python -m bench.paired REF.qrz A.qrz[:ACT] B.qrz[:ACT] ... [--tokens 32768] [--window 512] [--pair A B]

Every file scores the first --tokens wiki tokens (bench.quality's text and tokenization) in windows of --window,
as Model.perplexity does (each window behind BOS when the model's tokenizer adds one: Gemma-3), keeping each
token's negative log-likelihood. Two files' difference is then the mean of the per-token NLL differences, paired
on the same tokens, with its standard error over the windows (each window's --window - 1 scored tokens are one
block: neighbouring tokens are correlated, so single tokens would understate it). A difference of less than
about twice its standard error is not one this text can show. --pair A B adds a row for that difference too (A
and B as given among the files, ACT included). NLLs are cached in --cache per file, ACT, token count and build of
the native library (a rebuilt runtime may round differently), so adding a file costs only that file.

--kld N adds each file's KL divergence from the reference's next-token distribution, KL(ref || file) in nats,
averaged over the predictions of the first N tokens (the same windows; full vocabulary, float64), with its
standard error over windows. It needs every file loaded at once and a window's logits of each, so N is kept
small (4096 takes a few minutes for Gemma-3-270M). Unlike perplexity it is never below zero and does not
depend on which token the text happens to hold next.

--text c4|code scores another text of the same set instead of wiki, from token --skip on: the converter's
calibration reads c4's first 16384 tokens (--calib, --signround) and ranks candidates on the 4096 after them, so
`--text c4 --skip 24576` is c4 that no conversion has seen, to tell a format's fit to its calibration text's kind
from its fit to wiki.
"""
import argparse
import hashlib
import os
import sys
import time

import numpy as np

DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "paired-nll")
# the window convention of the cached NLLs (Model.scoring_windows): windows behind BOS for a model that adds one,
# since stop 28; NLLs cached before it are not reused
WINDOWS = "bos"


def split_spec(spec):
    """'m.qrz:4bit' -> ('m.qrz', '4bit'); 'm.qrz' -> ('m.qrz', None)"""
    path, sep, act = spec.rpartition(":")
    if sep and act in ("8bit", "4bit"):
        return path, act
    return spec, None


def text_ids(model, n_tokens, text="wiki", skip=0):
    """tokens skip .. skip + n_tokens of one of the texts (wiki: bench.quality's tokenization of it)"""
    from bench.quality import wiki_ids
    if text == "wiki":
        return wiki_ids(model, skip + n_tokens)[skip:]
    from tests import assets
    ids = model.tokenize(assets.text(text), special=False)
    if len(ids) < skip + n_tokens:
        raise ValueError(f"{text}.utf8 has {len(ids)} tokens, fewer than --skip {skip} + --tokens {n_tokens}")
    return ids[skip:skip + n_tokens]


def token_nll(spec, n_tokens, window, threads, cache, text="wiki", skip=0):
    """per-token NLL (float64) of the file on n_tokens tokens of `text` from `skip`, in windows of `window`, cached"""
    import pyqrt
    from pyqrt import _qrz
    path, act = split_spec(spec)
    st, lib = os.stat(path), os.stat(_qrz.__file__)
    where = "" if (text, skip) == ("wiki", 0) else f"|{text}|{skip}"   # wiki from 0 keeps the earlier cache keys
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{act}|{n_tokens}|{window}|"
                       f"{lib.st_size}|{lib.st_mtime_ns}{where}|{WINDOWS}".encode())
    dst = os.path.join(cache, key.hexdigest()[:16] + ".npy")
    if os.path.exists(dst):
        return np.load(dst)
    t0 = time.perf_counter()
    model = pyqrt.load(path, threads=threads, **({"act": act} if act else {}))
    ids = text_ids(model, n_tokens, text, skip)
    nll = np.concatenate([model.score(chunk) for chunk in model.scoring_windows(ids, window)])
    os.makedirs(cache, exist_ok=True)
    np.save(dst, nll)
    print(f"{spec}: {len(nll)} tokens in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return nll


def paired(a, b, block):
    """mean of a - b and its standard error over blocks of `block` tokens"""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    n = len(d) // block
    if n < 2:
        raise ValueError(f"need at least two blocks of {block} tokens, got {len(d)} tokens")
    means = d[:n * block].reshape(n, block).mean(axis=1)
    return float(d.mean()), float(means.std(ddof=1) / np.sqrt(n))


def kl_rows(ref_logp, logits):
    """KL(ref || softmax(logits)) per row, float64; ref_logp the reference's log-softmax (computed once per window
    for all files)"""
    from bench.quality import log_softmax64
    return (np.exp(ref_logp) * (ref_logp - log_softmax64(logits))).sum(axis=1)


def window_kld(specs, ref_spec, n_tokens, window, threads, text="wiki", skip=0):
    """{spec: per-window mean KL(ref || spec)} over n_tokens tokens of `text` from `skip`"""
    import pyqrt
    from bench.quality import log_softmax64

    def load(spec):
        path, act = split_spec(spec)
        return pyqrt.load(path, threads=threads, ctx=window, **({"act": act} if act else {}))
    ref = load(ref_spec)
    models = {s: load(s) for s in specs}
    ids = text_ids(ref, n_tokens, text, skip)
    out = {s: [] for s in specs}
    for chunk in ref.scoring_windows(ids, window):
        ref_logp = log_softmax64(ref.logits(chunk)[:-1])   # the predictions perplexity scores: all but the last
        for s, m in models.items():
            out[s].append(float(kl_rows(ref_logp, m.logits(chunk)[:-1]).mean()))
    return {s: np.array(v) for s, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the reference .qrz (usually f16)")
    p.add_argument("files", nargs="+", help="FILE.qrz[:8bit|:4bit]")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="two of the files, for their own difference")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--kld", type=int, default=0, metavar="N",
                   help="also KL(reference || file) over the first N tokens (full logits: keep N small)")
    p.add_argument("--text", choices=["wiki", "c4", "code"], default="wiki")
    p.add_argument("--skip", type=int, default=0, help="tokens of the text to skip before scoring")
    args = p.parse_args(argv)
    if args.skip < 0:
        p.error("--skip must not be negative")
    if args.tokens < 2 * args.window or args.window < 2:
        p.error("--tokens must be at least two windows, --window at least 2")
    if args.kld and args.kld < 2 * args.window:
        p.error("--kld must be 0 (off) or at least two windows of tokens")
    specs = [args.ref] + args.files
    for spec in specs:
        if not os.path.exists(split_spec(spec)[0]):
            p.error(f"no such file: {split_spec(spec)[0]}")
    for a, b in args.pair:
        if a not in args.files or b not in args.files:
            p.error(f"--pair {a} {b}: both must be among the files, spelled as there")
    nll = {s: token_nll(s, args.tokens, args.window, args.threads, args.cache, args.text, args.skip) for s in specs}
    ref = nll[args.ref]
    print(f"{args.text}, tokens {args.skip}-{args.skip + args.tokens} in windows of {args.window} ({len(ref)} scored); "
          f"Δ = mean NLL difference per token ± its standard error over the windows")
    print("| file | ppl | Δ vs reference |")
    print("|---|---:|---:|")
    print(f"| {args.ref} | {np.exp(ref.mean()):.3f} | |")
    for s in args.files:
        m, se = paired(nll[s], ref, args.window - 1)
        print(f"| {s} | {np.exp(nll[s].mean()):.3f} | {m:+.4f} ± {se:.4f} |")
    for a, b in args.pair:
        m, se = paired(nll[a], nll[b], args.window - 1)
        print(f"| {a} − {b} | | {m:+.4f} ± {se:.4f} |")
    if args.kld:
        kld = window_kld(args.files, args.ref, args.kld, args.window, args.threads, args.text, args.skip)
        print(f"\nKL(reference || file), nats per prediction, {args.kld} tokens from {args.skip}, "
              "± standard error over windows")
        print("| file | KL |")
        print("|---|---:|")
        for s in args.files:
            v = kld[s]
            se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
            print(f"| {s} | {v.mean():.4f} ± {se:.4f} |")


if __name__ == "__main__":
    main()
