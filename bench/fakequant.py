"""Fake-quantization in transformers, to choose a format's parameters before writing kernels for them:
the linear layers' weights are replaced by a format's dequantized values (convert/formats, the same code the
converter runs) and their inputs by quantize-dequantize hooks; prints wiki.utf8 perplexity (windows of 512).

    python -m bench.fakequant MODEL WEIGHTS GROUP ACTS [TOKENS]
    e.g. python -m bench.fakequant gemma3 sdr 16 f32 1024

WEIGHTS: f32 | sdr | sdrplain (QRazor's rule, no search) | sdrB<bits> (an int<bits> row base) | int4; "+awq" after
sdr weighs its search by c4 input mean squares, "+gptq" rounds it by error feedback on c4 input Gram matrices
(both from 16384 tokens of c4, as the converter's --calib); or a .qrz file's path: its matrices as stored.
ACTS: f32 | i8row | q8g | q4g | sdr4 | sdr8 (int16 base razored to 8 bits) | sdr8g32.
Test-only tools (torch, transformers); the runtime's own numbers come from bench.quality.
"""
import os
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from convert.formats import int4, sdr
from pyqrt.model import scoring_windows
from tests import assets

torch.set_num_threads(2)
CALIB_TOKENS = int(os.environ.get("CALIB_TOKENS", 16384))   # the converter's --calib-tokens default
if len(sys.argv) < 5:
    sys.exit(__doc__)
name = sys.argv[1]; wfmt = sys.argv[2]; G = int(sys.argv[3]); afmt = sys.argv[4]; ntok = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
d = {"gemma3": assets.gemma3_hf, "qwen25": assets.qwen25_hf, "smollm2": assets.smollm2_hf}[name]()
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
def q_rows_i8(x):
    s = x.abs().amax(-1, keepdim=True) / 127; s[s == 0] = 1
    return torch.round(x / s) * s
def q_groups(x, G, qmax, lo, hi):
    sh = x.shape; g = x.reshape(*sh[:-1], sh[-1] // G, G)
    s = g.abs().amax(-1, keepdim=True) / qmax; s[s == 0] = 1
    return (torch.clamp(torch.round(g / s), lo, hi) * s).reshape(sh)
def sdr_act(x, G, base=32767, keep=4):
    sh = x.shape
    s = x.abs().amax(-1, keepdim=True) / base; s[s == 0] = 1
    b = torch.clamp(torch.round(x / s), -base, base)
    g = b.reshape(*sh[:-1], sh[-1] // G, G)
    mx = g.abs().amax(-1, keepdim=True)
    L = torch.floor(torch.log2(torch.clamp(mx, min=1)))
    e = torch.clamp(L - (keep - 2), min=0)
    lim = 2 ** (keep - 1)
    m = torch.clamp(torch.round(g / 2 ** e), -lim, lim - 1)
    return (m * 2 ** e).reshape(sh) * s
acts = {
 "f32": lambda x: x,
 "i8row": q_rows_i8,
 "q8g": lambda x: q_groups(x, G, 127, -127, 127),
 "q4g": lambda x: q_groups(x, G, 7, -8, 7),
 "sdr4": lambda x: sdr_act(x, G),
 "sdr8": lambda x: sdr_act(x, G, keep=8),
 "sdr8g32": lambda x: sdr_act(x, 32, keep=8),
}
fa = acts[afmt]
col_weights, grams = {}, {}
if wfmt.endswith("+awq") or wfmt.endswith("+gptq"):
    # input mean squares (or Gram matrices) per linear layer on calibration text (c4, never the evaluation text)
    wfmt, _, how = wfmt.partition("+")
    hooks = []
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ("self_attn" in n or "mlp" in n):
            def rec(m, a, n=n):
                x = a[0].reshape(-1, a[0].shape[-1]).double()
                s, c = col_weights.get(n, (0, 0))
                col_weights[n] = (s + (x.T @ x if how == "gptq" else (x * x).sum(0)), c + x.shape[0])
            hooks.append(mod.register_forward_pre_hook(rec))
    cal = tok(assets.text("c4"), add_special_tokens=False)["input_ids"][:CALIB_TOKENS]
    with torch.no_grad():
        for s0 in range(0, len(cal), 512):
            model(torch.tensor([cal[s0:s0 + 512]]))
    for h in hooks:
        h.remove()
    col_weights = {n: (s / c).numpy() for n, (s, c) in col_weights.items()}
    if how == "gptq":
        grams, col_weights = col_weights, {}
stored = {}
if wfmt.endswith(".qrz"):
    import pyqrt
    from convert.formats import FORMATS
    raw = np.memmap(wfmt, dtype=np.uint8, mode="r")
    stored = {t["name"]: t for t in pyqrt.open_file(wfmt).tensors}
with torch.no_grad():
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ("self_attn" in n or "mlp" in n):
            w = mod.weight.detach().numpy().astype(np.float32)
            r, c = w.shape
            if wfmt == "sdr":
                wd = sdr.dequantize(sdr.quantize(w, G, col_weight=col_weights.get(n), gram=grams.get(n)), r, c, G)
            elif wfmt.startswith("sdrB"):
                B = int(wfmt[4:]); qmax = 2 ** (B - 1) - 1
                sc = np.abs(w).max(1, keepdims=True) / qmax; sc[sc == 0] = 1
                b = np.clip(np.rint(w / sc), -qmax, qmax)
                mm, ee = sdr.razor(b, G, True)
                wd = (mm.astype(np.float32).reshape(r, -1, G) * (2.0 ** ee)[:, :, None]).reshape(r, c) * sc
            elif wfmt == "sdrplain": wd = sdr.dequantize(sdr.quantize(w, G, search=False), r, c, G)
            elif wfmt == "int4": wd = int4.dequantize(int4.quantize(w, G), r, c, G)
            elif stored:
                t = stored[n + ".weight"]
                wd = FORMATS[t["type"]].dequantize(raw[t["offset"]:t["offset"] + t["nbytes"]], r, c, t["group_size"])
            else: wd = w
            mod.weight.copy_(torch.from_numpy(wd))
            mod.register_forward_pre_hook(lambda m, a: (fa(a[0]),))
text = assets.text("wiki")
ids = tok(text, add_special_tokens=False)["input_ids"][:ntok]
nll, cnt = 0.0, 0
t = time.time()
with torch.no_grad():
    # the windows Model.perplexity scores: behind BOS when the tokenizer adds one (Gemma-3)
    for window in scoring_windows(ids, 512, assets.hf_scoring_bos(tok)):
        ch = torch.tensor([window])
        lg = model(ch).logits[0, :-1].double()
        lp = torch.log_softmax(lg, -1).gather(1, ch[0, 1:, None])
        nll -= lp.sum().item(); cnt += ch.shape[1] - 1
print(f"{name} w={wfmt} G={G} act={afmt} ppl={np.exp(nll/cnt):.4f} ({time.time()-t:.0f}s)", flush=True)
