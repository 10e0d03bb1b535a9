"""SignRound on one block, watched from outside: the block's output error on held-out text as tuning goes.

    python -m bench.signround_block --format fp4 --layer 6 --group 64 [--tune both|V|alpha] [--iters 100]
                                    [--calib] [--lr 1]

Gemma-3-270M (the test asset), float inputs to the block (the float model's earlier blocks) on --samples sequences
of 256 c4 tokens (default 128, what the converter tunes on) and 8 of 256 wiki tokens (held out: never tuned on),
each behind BOS as the converter reads them. The block's quantizers (convert/signround.py's Rounders, started as the
converter starts them without calibration, or with --calib at the format's calibrated rounding from the Gram matrix
of the block's float inputs on the c4 sequences) are tuned by the converter's SignSGD for --iters steps on batches
of 4 c4 sequences (first step --lr / iters), moving V, alpha or both whatever the Rounder's own params() say; every
25 steps it prints, for the current step (no best-step selection), the relative error |y_q - y|^2 / |y|^2 of the
block's output and the converter's channel-weighted loss, on the wiki, the held-out c4 and the c4 tuned on.
Needs torch (the signround extra) and the test assets (`python -m tests.assets hf --model gemma3`).
"""
import argparse

import numpy as np

from convert import signround as sr
from convert.architectures import architecture, model_metadata, transform
from convert.hf import TensorSource, read_config
from tests.assets import gemma3_hf, model_qrz, text

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "self_attn.q_norm", "self_attn.k_norm")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=sr.FORMATS, required=True)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--tune", choices=("both", "V", "alpha"), default=None,
                   help="what SignSGD moves (default: what the Rounder's TUNE_ALPHA says)")
    p.add_argument("--iters", type=int, default=sr.DEFAULT_ITERS)
    p.add_argument("--samples", type=int, default=sr.DEFAULT_SAMPLES, help="c4 sequences tuned on")
    p.add_argument("--batch", type=int, default=sr.DEFAULT_BATCH)
    p.add_argument("--calib", action="store_true",
                   help="start at the format's calibrated rounding (what --calib writes), from the Gram matrix of the "
                        "block's float inputs on the c4 sequences, instead of its data-free search")
    p.add_argument("--lr", type=float, default=1.0, help="SignSGD's first step in units of 1/iters (the converter: 1)")
    args = p.parse_args()
    if args.calib and args.format == "int4":
        p.error("--calib: INT4 has no calibrated rounding; it starts at round to nearest either way")

    import torch
    torch.set_num_threads(1)
    import pyqrt
    model_dir = gemma3_hf()
    config = read_config(model_dir)
    arch = architecture(config)
    source = TensorSource(model_dir)
    meta = model_metadata(arch, config, source.shape("model.embed_tokens.weight")[0])

    def load(name):
        return transform(arch, name, source.load(name)).astype("float32")

    tok = pyqrt.load(model_qrz("gemma3", "f16"), threads=1)

    def behind_bos(seqs):       # as the converter tunes and Model.scoring_windows reads Gemma-3: behind BOS
        return np.concatenate([np.full((len(seqs), 1), tok.scoring_bos), seqs], axis=1)

    wiki = behind_bos(np.array(tok.tokenize(text("wiki")[:100000], special=False)[:8 * 256]).reshape(8, 256))
    c4_all = np.array(tok.tokenize(text("c4"), special=False))
    c4 = behind_bos(c4_all[:args.samples * 256].reshape(args.samples, 256))
    c4_held = behind_bos(c4_all[-8 * 256:].reshape(8, 256))      # the text's end, never tuned on
    graph = sr.BlockGraph(torch, meta, arch)
    embed = load("model.embed_tokens.weight")

    def block_params(layer):
        pre = f"model.layers.{layer}."
        norms = {s + ".weight": torch.from_numpy(load(pre + s + ".weight")) for s in NORMS}
        return norms, {s: torch.from_numpy(load(pre + s + ".weight")) for s in sr.LINEARS}

    def inputs(ids):
        x = torch.from_numpy(embed[ids] * np.float32(graph.embed_scale))
        for layer in range(args.layer):
            norms, w = block_params(layer)
            x = sr._through(torch, graph, layer, x, norms, w.__getitem__)
        return x

    x_wiki, x_c4, x_held = inputs(wiki), inputs(c4), inputs(c4_held)
    norms, w_float = block_params(args.layer)
    y_wiki = sr._through(torch, graph, args.layer, x_wiki, norms, w_float.__getitem__)
    y_held = sr._through(torch, graph, args.layer, x_held, norms, w_float.__getitem__)
    y_c4 = sr._through(torch, graph, args.layer, x_c4, norms, w_float.__getitem__)
    energy = sr._InputStats(0, np.random.default_rng(0))
    sr._through(torch, graph, args.layer, x_c4[:32], norms, w_float.__getitem__, energy)
    starts = {}
    if args.calib:
        from convert.formats import Calibration
        grams = {}

        def gram(name, h):
            x = h.detach().reshape(-1, h.shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        sr._through(torch, graph, args.layer, x_c4, norms, w_float.__getitem__, gram)
        rows = x_c4.shape[0] * x_c4.shape[1]
        starts = {s: {"calib": Calibration(gram=(grams[s] / rows).numpy())} for s in sr.LINEARS}
    rounders = {s: sr.ROUNDERS[args.format](torch, w_float[s].numpy(), args.group, energy.mean_energy(s),
                                            **starts.get(s, {}))
                for s in sr.LINEARS}

    def errors():
        with torch.no_grad():
            w = {s: r.fake() for s, r in rounders.items()}
            out = []
            for x, y in ((x_wiki, y_wiki), (x_held, y_held), (x_c4, y_c4)):
                yq = sr._through(torch, graph, args.layer, x, norms, w.__getitem__)
                out.append(float(((yq - y) ** 2).mean() / (y ** 2).mean()))
                out.append(float(sr.channel_weighted_loss(y)(yq, y)))
        return out

    params = []
    for r in rounders.values():
        chosen = {"both": [r.V, r.alpha], "V": [r.V], "alpha": [r.alpha]}.get(args.tune)
        params += r.params() if chosen is None else chosen
    for t in params:
        t.requires_grad_(True)
    print(f"{args.format} G={args.group} layer {args.layer}, tuning {args.tune or 'the default'}: "
          f"relative output error, then the converter's channel-weighted loss (held-out wiki, held-out c4, "
          f"the c4 tuned on)")
    print(f"step 0: " + " ".join(f"{e:.3e}" for e in errors()), flush=True)
    rng = np.random.default_rng(0)
    block_loss = sr.channel_weighted_loss(y_c4)   # the converter's loss
    for step in range(args.iters):
        pick = torch.from_numpy(rng.choice(len(c4), size=args.batch, replace=False))
        y = graph.forward(args.layer, x_c4[pick], norms, lambda s: rounders[s].fake())
        loss = block_loss(y, y_c4[pick])
        for t in params:
            t.grad = None
        loss.backward()
        lr = (args.lr / args.iters) * (1.0 - step / args.iters)
        with torch.no_grad():
            for t in params:
                t -= lr * torch.sign(t.grad)
        if (step + 1) % 25 == 0 or step + 1 == args.iters:
            print(f"step {step + 1}: " + " ".join(f"{e:.3e}" for e in errors()), flush=True)


if __name__ == "__main__":
    main()
