"""Activation forms compared on single layers: the relative output error |x̂ W^T - x W^T|² / |x W^T|² of one matrix
when its input x is quantized in different ways and W is an FP4 or SQ file's (dequantized) weights.

    python -m bench.act_error FP4_OR_SQ_FILE.qrz --model qwen25 [--layers 0,6,12,18,23] [--kind down_proj]

x: input rows of the model's f16 file reading c4 tokens 20000-22048 (past the 16384 the converter calibrates on),
256 rows drawn uniformly (Model.input_statistics samples=), of which the last 128 are scored. Forms:
- stored: the file's own FP4 activation parameters (layout, channel offsets, per-token scale), as act="4bit" runs;
- int4 g64: round-to-nearest int4 per group of 64, absmax / 7 (INT4's act="4bit");
- E2M1 g64: FP4 E2M1 with a float scale per group of 64 (absmax / 6);
- E2M1 2^-e: FP4 E2M1 with the row's scale times a power-of-two exponent per group of 64 (SDR's trick).
For an SQ file, in place of the FP4 forms: its stored hot channels (as act="4bit" runs); twice and four times as
many, ranked as the converter ranks them but by these tokens' channel maxima; the stored ones with the cold scale
clipped to 0.85 of the group's maximum; twice as many with that clipping.
A numpy experiment for choosing the next activation form (docs/QUANTIZATION.md), not a runtime path.
"""
import argparse

import numpy as np

import pyqrt
from convert.formats import fp4, sq
from tests import assets


def int4_groups(x, g=64):
    n, c = x.shape
    xg = x.reshape(n, c // g, g)
    d = np.abs(xg).max(2, keepdims=True) / 7
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    return (np.clip(np.rint(xg * inv), -8, 7) * d).reshape(n, c)


def e2m1_groups(x, g=64, pow2=False):
    n, c = x.shape
    xg = x.reshape(n, c // g, g)
    top = fp4.codebook(2)[-1]
    s = np.abs(xg).max(2, keepdims=True) / top
    if pow2:   # the row's scale, divided by the largest power of two that keeps the group's max in range
        srow = np.abs(x).max(1)[:, None, None] / top
        with np.errstate(divide="ignore"):
            e = np.clip(np.floor(np.log2(np.where(s > 0, srow / np.where(s > 0, s, 1), 1))), 0, 12)
        s = srow / 2.0 ** e
    inv = np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)
    return (fp4.signed_lut(2)[fp4.encode(xg * inv, 2)] * s).reshape(n, c)


def sq_clipped(x, hot, g, clip):
    """SQ's activation form with the cold channels' scale clipped: d = max(clip * max|cold| / 7, max|hot| / 127)"""
    n, c = x.shape
    xg, h = x.reshape(n, c // g, g), np.asarray(hot, bool).reshape(1, c // g, g)
    a = np.abs(xg)
    d = np.maximum(clip * np.where(h, 0, a).max(2) / 7, np.where(h, a, 0).max(2) / 127)
    u = np.rint(xg * np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)[:, :, None])
    return (np.where(h, np.clip(u, -127, 127), np.clip(u, -8, 7)) * d[:, :, None]).reshape(n, c)


def forms_of(t, buf, absmax, held):
    """-> (column names, the tensor's dequantized weights, held quantized each way)"""
    rows, cols = t["shape"]
    g = t["group_size"]
    if t["type"] == "sq":
        w, hot = sq.dequantize(buf, rows, cols, g), sq.unpack(buf, rows, cols, g)["hot"]
        hot2, hot4 = (sq.hot_channels(absmax, w, f * int(hot.sum())) for f in (2, 4))
        return (["int4 g64", "sq stored", "sq 2x hot", "sq 4x hot", "sq clip .85", "sq 2x hot clip .85", "E2M1 g64"],
                w, [int4_groups(held), sq.dequantize_acts(held, hot, g), sq.dequantize_acts(held, hot2, g),
                    sq.dequantize_acts(held, hot4, g), sq_clipped(held, hot, g, 0.85), sq_clipped(held, hot2, g, 0.85),
                    e2m1_groups(held)])
    q = fp4.unpack(buf, rows, cols, g)
    return (["stored", "int4 g64", "E2M1 g64", "E2M1 2^-e"], fp4.dequantize(buf, rows, cols, g),
            [fp4.dequantize_acts(held, q["e_a"], q["mode"], q["scale"], q["shifts"], g), int4_groups(held),
             e2m1_groups(held), e2m1_groups(held, pow2=True)])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.act_error", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="an fp4 or sq .qrz of the model")
    p.add_argument("--model", default="qwen25", choices=sorted(assets.MODELS))
    p.add_argument("--layers", default="0,6,12,18,23")
    p.add_argument("--kind", default="down_proj", help="mlp.down_proj, self_attn.q_proj, ... (the suffix is enough)")
    args = p.parse_args(argv)
    m = pyqrt.load(assets.model_qrz(args.model, "f16", 32), ctx=512)
    ids = m.tokenize(open(assets.text_path("c4")).read(), special=False)[20000:22048]
    tensors = {t["name"]: t for t in pyqrt.open_file(args.file).tensors}
    names = [n for n in tensors if n.endswith(args.kind + ".weight") and tensors[n]["type"] in ("fp4", "sq")
             and int(n.split(".")[2]) in {int(v) for v in args.layers.split(",")}]
    if not names:
        p.error(f"no fp4 or sq tensor named *{args.kind}.weight in layers {args.layers} of {args.file}")
    stats = m.input_statistics(ids, window=512, samples=256)
    raw = np.memmap(args.file, np.uint8, "r")
    header = False
    for name in sorted(names, key=lambda n: int(n.split(".")[2])):
        t = tensors[name]
        held = stats[name][2][128:]
        cols, w, forms = forms_of(t, np.asarray(raw[t["offset"]:t["offset"] + t["nbytes"]]), stats[name][1], held)
        if not header:
            print("| input of | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
            header = True
        y = held @ w.T
        errs = [float(((x @ w.T - y) ** 2).sum() / (y ** 2).sum()) for x in forms]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
