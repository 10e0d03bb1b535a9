"""SignRound (convert/signround.py): its PyTorch block is the runtime's graph, its learnable quantizers write
exactly the bytes they model, and a tuned conversion beats round-to-nearest on the text it learned from."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pyqrt  # noqa: E402
from convert import ConvertError, convert  # noqa: E402
from convert import signround as sr  # noqa: E402
from convert.architectures import architecture, model_metadata, transform  # noqa: E402
from convert.formats import Calibration, fp4, int4, sdr, sq  # noqa: E402
from convert.hf import TensorSource, read_config  # noqa: E402
from tests.tiny import TEXT, make_tiny_hf, make_tiny_llama  # noqa: E402


def _tiny(tmp_path, arch):
    d = tmp_path / arch
    if arch == "llama":
        make_tiny_llama(str(d), hidden=64, heads=4, kv_heads=2, ff=128)
    else:
        make_tiny_hf(str(d), arch)
    return str(d)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_block_graph_is_the_runtime_forward(tmp_path, arch):
    """embedding, every block through BlockGraph, the final norm and the head in torch give the logits the C
    runtime computes from the f32 .qrz (so SignRound tunes against the model that will run)"""
    d = _tiny(tmp_path, arch)
    out = convert(d, str(tmp_path / "m.qrz"), fmt="f32", progress=False)
    model = pyqrt.load(out, ctx=64)
    ids = model.tokenize(" ".join(TEXT), special=False)[:40]
    assert len(ids) == 40
    expected = model.logits(ids)

    config = read_config(d)
    arch_name = architecture(config)
    source = TensorSource(d)
    try:
        def load(name):
            return transform(arch_name, name, source.load(name)).astype(np.float32) if name in source.where else None
        meta = model_metadata(arch_name, config, source.shape("model.embed_tokens.weight")[0])
        graph = sr.BlockGraph(torch, meta, arch_name)
        x = torch.from_numpy(load("model.embed_tokens.weight")[np.array(ids)][None] * np.float32(graph.embed_scale))
        for layer in range(meta["model.n_layers"]):
            prefix = f"model.layers.{layer}."
            p = {n[len(prefix):]: torch.from_numpy(load(n)) for n in source.where
                 if n.startswith(prefix) and load(n).ndim == 1}
            w = {s: torch.from_numpy(load(prefix + s + ".weight")) for s in sr.LINEARS}
            x = graph.forward(layer, x, p, w.__getitem__)
        head = load("lm_head.weight") if "lm_head.weight" in source.where else load("model.embed_tokens.weight")
        logits = (graph.rmsnorm(x[0], torch.from_numpy(load("model.norm.weight"))) @ torch.from_numpy(head).T).numpy()
    finally:
        source.close()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, atol=2e-4 * scale, rtol=0)
    assert np.array_equal(logits.argmax(axis=1), expected.argmax(axis=1))


def _weights(rows=24, cols=128, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random(w.shape) < 0.02] *= 8                      # outliers, so clipping and slots matter
    w[0, :64] = 0                                          # an all-zero group
    energy = rng.uniform(0.1, 4, cols).astype(np.float32)
    return w, energy


ROUNDER_CASES = [("int4", 32, int4, {}), ("sdr", 16, sdr, {}), ("fp4", 64, fp4, {}), ("sq", 64, sq, {})]


@pytest.mark.parametrize("fmt,group,module,extra", ROUNDER_CASES)
def test_rounder_bytes_decode_to_its_fake_weights(fmt, group, module, extra):
    """for any offsets and clipping factors, the bytes pack() writes decode (the format's numpy reference) to
    the weights fake() trained with"""
    w, energy = _weights()
    r = sr.ROUNDERS[fmt](torch, w, group, energy, **extra)
    rng = np.random.default_rng(1)
    with torch.no_grad():
        r.V.copy_(torch.from_numpy(rng.uniform(-0.5, 0.5, r.V.shape).astype(np.float32)))
        r.alpha.copy_(torch.from_numpy(rng.uniform(0.3, 1.1, r.alpha.shape).astype(np.float32)))
        fake = r.fake().numpy()
    decoded = module.dequantize(r.pack(), *w.shape, group)
    assert len(r.pack()) == (module.nbytes(*w.shape, group, r.k) if fmt == "sq" else module.nbytes(*w.shape, group))
    scale = np.abs(w).max()
    mismatch = ~np.isclose(decoded, fake, atol=1e-5 * scale, rtol=1e-5)
    assert mismatch.mean() < 1e-3, f"{mismatch.sum()} of {mismatch.size} weights differ"   # fp4: exact ties only
    assert not np.array_equal(decoded, module.dequantize(module.quantize(w, group), *w.shape, group))


@pytest.mark.parametrize("fmt,group,module,extra", ROUNDER_CASES)
def test_rounder_starts_at_the_format_search(fmt, group, module, extra):
    """V = 0 and the initial alpha reproduce the format's own data-free choice (SDR: its row scales and shifts,
    with w / (s 2^e) rounded once, where the format rounds to the int8 base first)"""
    w, energy = _weights(seed=2)
    r = sr.ROUNDERS[fmt](torch, w, group, energy, **extra)
    with torch.no_grad():
        start = r.fake().numpy()
    if fmt == "sdr":
        s, e, _ = sdr.quantize_parts(w, group, col_weight=energy)
        step = s[:, None, None] * 2.0 ** e.astype(np.float32)[:, :, None]
        g = w.reshape(w.shape[0], -1, group)
        m = np.clip(np.rint(g / np.where(step > 0, step, 1)), -8, 7).astype(np.int8).reshape(w.shape)
        own = sdr.dequantize(sdr.pack(s, e, m, group), *w.shape, group)
    elif fmt == "fp4":
        e = r.e
        own = fp4.dequantize_weights(*fp4.quantize_weights(w, group, e, energy), group, e)
    elif fmt == "sq":
        own = sq.dequantize_parts(*sq.quantize_parts(w, group, r.k, energy), group)
    else:
        own = int4.dequantize(int4.quantize(w, group), *w.shape, group)
    same = np.isclose(start, own, atol=1e-6 * np.abs(w).max(), rtol=1e-6)
    assert same.mean() > 0.995


@pytest.mark.parametrize("fmt,group,module", [("sdr", 16, sdr), ("fp4", 64, fp4), ("sq", 64, sq)])
def test_calibrated_start_is_what_calib_alone_writes(fmt, group, module):
    """given the converter's calibration statistics, a rounder starts at the bytes --calib alone writes (SDR's
    error feedback, FP4's output-error search, SQ's nearest rounding on its calibrated importance), and its offsets
    still reach the codes: a third of a step moves the weights near an edge of their interval to the next code
    (an offset that put every weight mid-interval would move none)"""
    w, _ = _weights(seed=4)
    x = np.random.default_rng(5).standard_normal((512, w.shape[1])).astype(np.float32)
    x[:, 3] *= 20                                                    # a hot input channel
    calib = Calibration(gram=(x.T @ x / len(x)).astype(np.float32))
    r = sr.ROUNDERS[fmt](torch, w, group, np.ones(w.shape[1], np.float32), calib=calib)
    if fmt == "sq":
        want = module.quantize(w, group, calib=calib, rounding="nearest")
    else:
        want = module.quantize(w, group, calib=calib)
    decoded = lambda buf: module.dequantize(buf, *w.shape, group)   # noqa: E731
    same = np.isclose(decoded(r.pack()), decoded(want), atol=1e-6 * np.abs(w).max(), rtol=1e-6)
    assert same.mean() > 0.999, f"{(~same).sum()} of {same.size} weights differ from --calib's"
    with torch.no_grad():
        r.V += 0.3 * torch.sign(torch.from_numpy(np.random.default_rng(6).standard_normal(r.V.shape)).float())
    assert (decoded(r.pack()) != decoded(want)).mean() > 0.05


def test_rounder_gradients_reach_offsets_and_clipping():
    w, energy = _weights(seed=3)
    for fmt, group, _, extra in ROUNDER_CASES:
        r = sr.ROUNDERS[fmt](torch, w, group, energy, **extra)
        r.V.requires_grad_(True)
        r.alpha.requires_grad_(True)
        target = torch.from_numpy(w)
        ((r.fake() - target) ** 2).sum().backward()
        assert r.V.grad is not None and float(r.V.grad.abs().sum()) > 0, fmt
        assert r.alpha.grad is not None and float(r.alpha.grad.abs().sum()) > 0, fmt
        # what SignSGD moves: V always, alpha only where the rounder says so
        assert any(t is r.V for t in r.params()), fmt
        assert any(t is r.alpha for t in r.params()) == r.TUNE_ALPHA, fmt


def test_scale_gradient_leans_one_way():
    """why alpha is not tuned (Rounder.TUNE_ALPHA): the straight-through gradient of the weight error with respect
    to alpha is 2 d (value - w/d)^2 >= 0 for every weight inside the range, so only clipped weights pull the scale
    back up. INT4 starts unclipped (alpha = 1), and FP4's nearest-code lookup passes the gradient even past its top
    code: in both, every group's gradient says shrink"""
    w, energy = _weights(seed=4)
    for fmt, group, _, extra in [case for case in ROUNDER_CASES if case[0] in ("int4", "fp4")]:
        r = sr.ROUNDERS[fmt](torch, w, group, energy, **extra)
        r.alpha.requires_grad_(True)
        ((r.fake() - torch.from_numpy(w)) ** 2).sum().backward()
        g = r.alpha.grad.numpy()
        assert np.all(g >= -1e-6 * np.abs(g).max()), fmt
        assert np.mean(g > 0) > 0.5, fmt


def _calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(TEXT * 30), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", ["int4", "sdr", "fp4", "sq"])
def test_signround_conversion_beats_round_to_nearest_on_its_text(tmp_path, fmt):
    """a tuned tiny model's logits on the calibration text are nearer the float model's than the same format's
    data-free conversion is; the file records the tuning"""
    d = _tiny(tmp_path, "llama")
    calib = _calib_text(tmp_path)
    group = 32 if fmt != "sdr" else 16
    ref = pyqrt.load(convert(d, str(tmp_path / "f32.qrz"), fmt="f32", progress=False), ctx=64)
    plain = pyqrt.load(convert(d, str(tmp_path / "plain.qrz"), fmt=fmt, group_size=group, progress=False), ctx=64)
    tuned_path = convert(d, str(tmp_path / "tuned.qrz"), fmt=fmt, group_size=group, calib=calib, signround=True,
                         iters=40, samples=8, seqlen=32, progress=False)
    tuned = pyqrt.load(tuned_path, ctx=64)
    assert "signround" in "".join(f"{k}={v}" for k, v in tuned.file.metadata.items())
    ids = ref.tokenize(open(calib).read(), special=False)[:64]
    want = ref.logits(ids)
    err_plain = float(((plain.logits(ids) - want) ** 2).mean())
    err_tuned = float(((tuned.logits(ids) - want) ** 2).mean())
    assert err_tuned < err_plain, (err_tuned, err_plain)


def test_signround_block_reports(tmp_path):
    """tune() reports each block's loss before and after, judged on the held-out sequences (one of eight here);
    the kept step is the start or a checkpoint, and its loss is never above the start's"""
    d = _tiny(tmp_path, "qwen2")
    config = read_config(d)
    arch = architecture(config)
    source = TensorSource(d)
    try:
        def load(name):
            return transform(arch, name, source.load(name)).astype(np.float32) if name in source.where else None
        meta = model_metadata(arch, config, source.shape("model.embed_tokens.weight")[0])
        ids = list(np.random.default_rng(0).integers(0, meta["model.n_vocab"], 8 * 16))
        out, reports = sr.tune("sdr", meta, arch, load, 16, ids, iters=10, seqlen=16, batch=2, progress=False)
    finally:
        source.close()
    assert [r["block"] for r in reports] == list(range(meta["model.n_layers"]))
    assert all(r["best_loss"] <= r["first_loss"] for r in reports)
    assert any(r["best_loss"] < r["first_loss"] for r in reports)
    assert all(r["judged_on"] == "held-out" for r in reports)
    marks = {0} | {max(1, round(f * 10)) for f in sr.CHECKPOINTS}
    assert all(r["kept"] in marks for r in reports)
    assert set(out) == {f"model.layers.{i}.{s}.weight" for i in range(meta["model.n_layers"]) for s in sr.LINEARS}


def test_signround_refusals(tmp_path, monkeypatch):
    d = _tiny(tmp_path, "llama")
    calib = _calib_text(tmp_path)
    out = str(tmp_path / "x.qrz")
    with pytest.raises(ConvertError, match="--calib"):
        convert(d, out, fmt="sdr", signround=True, progress=False)
    with pytest.raises(ConvertError, match="4-bit formats"):
        convert(d, out, fmt="q8", calib=calib, signround=True, progress=False)
    with pytest.raises(ConvertError, match="add --signround"):
        convert(d, out, fmt="sdr", calib=calib, iters=5, progress=False)
    with pytest.raises(ConvertError, match="--samples must be a positive integer"):
        convert(d, out, fmt="sdr", calib=calib, signround=True, samples=0, progress=False)
    with pytest.raises(ConvertError, match="fewer than one sequence"):
        convert(d, out, fmt="sdr", calib=calib, signround=True, seqlen=10 ** 6, samples=1, progress=False)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)   # import torch now raises ImportError
    with pytest.raises(ConvertError, match=r"pyqrt\[signround\]"):
        convert(d, out, fmt="sdr", calib=calib, signround=True, progress=False)
    assert not os.path.exists(out)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".qrz")] == []
