"""Every supported architecture against transformers, on tiny random models that transformers itself builds and
saves (tests/tiny.py make_tiny_hf): Llama-2, TinyLlama-style GQA, Llama-3 (llama3 RoPE), linear RoPE, Mistral
with and without a sliding window, Qwen2 (q/k/v biases), Gemma-3 text (q/k norms, norms before and after
attention and MLP, GELU-tanh, scaled embeddings, query_pre_attn_scalar, sliding and full layers with their own
RoPE bases), and config.json files in the older layouts found on the Hub.

transformers (float32, eager attention) is the specification; nothing here reads the implementation. The
sliding window is W = 8 tokens and the sequences 56-64 tokens, so every sequence spans seven or more windows.
transformers' window: position p attends to keys p-W+1 .. p (test_oracle_window_semantics).

Tolerances, relative: max |got - want| / max |want| over the whole (positions x vocabulary) logits matrix.
- f32: 2e-5. A correct float32 forward pass lands at 3e-7 .. 1.5e-6 here (another summation order than torch);
  test_oracle_catches_each_mistake shows that each plausible mistake (attention scale, RoPE base or scaling,
  window one too long or short, sliding layers run as full, norms without Gemma's +1, biases or embedding scale
  left out, exact GELU for the tanh one) moves the logits by more than 5x this bound; all but the GELU one
  (2.9e-4) by more than 0.1.
- f16: 5e-3, q8 (group 32): 1e-1. Loose sanity bounds, 2-4x above what was measured (f16 at most 1.2e-3, q8
  at most 4.4e-2 on these unit-scale random weights): they catch a broken dequantisation or a mixed-up tensor;
  subtle errors are the f32 tests' job.
"""
import importlib.util
import os

import numpy as np
import pytest

_MISSING = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
if _MISSING and os.environ.get("CI"):   # as conftest: in CI a skip would hide a broken install
    raise ImportError(f"CI: {', '.join(_MISSING)} not importable; .ci/run should have installed them")
if _MISSING:
    pytest.skip(f"needs {', '.join(_MISSING)} (the test-only oracle)", allow_module_level=True)

import pyqrt
from convert import ConvertError, convert
from pyqrt import _native
from pyqrt._native import lib
from tests.tiny import DROP, edit_config, make_tiny_hf

W = 8                                   # sliding window of every windowed variant
F32_TOL, F16_TOL, Q8_TOL = 2e-5, 5e-3, 1e-1
N_LOGITS, N_PROMPT, N_GEN = 56, 40, 24  # N_PROMPT + N_GEN = 64 = 8 windows
CTX = 192

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# with head_dim 16 and theta 5e5 the wavelengths 2*pi*theta^(2i/16) are 6.3, 32, 167, 858, ...: with
# original_max_position_embeddings 64 (low_freq_wavelen 64, high_freq_wavelen 16) pair 0 is kept, pair 1 is
# smoothed and pairs 2-7 are divided by 8, so all three branches of the llama3 rule are used, and at positions up
# to 63 the scaled angles differ from the unscaled ones by radians
GEMMA_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
GEMMA_ROPE_LINEAR = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}

# name: (architecture, transformers config overrides, edits to the written config.json)
VARIANTS = {
    "llama2": ("llama", dict(num_key_value_heads=4), None),
    "tinyllama_gqa": ("llama", dict(num_key_value_heads=1), None),         # 4 query heads share one k/v head
    "llama3": ("llama", dict(rope_parameters=LLAMA3), None),
    # Llama-3.x config.json as published: top-level rope_theta and a rope_scaling dict
    "llama3_hub_config": ("llama", dict(rope_parameters=LLAMA3),
                          {"rope_parameters": DROP, "rope_theta": 500000.0,
                           "rope_scaling": {k: v for k, v in LLAMA3.items() if k != "rope_theta"}}),
    "llama_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
                     None),
    # the older spelling of linear scaling (long-context Llama-2 fine-tunes): rope_scaling {"type": "linear"}
    "llama_linear_hub_config": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                               "rope_theta": 10000.0}),
                                {"rope_parameters": DROP, "rope_theta": 10000.0,
                                 "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "mistral_swa": ("mistral", dict(sliding_window=W), None),
    # sliding_window null, and a head_dim that is not hidden / heads (as Mistral-Nemo: 32 != 64 / 4)
    "mistral_full": ("mistral", dict(sliding_window=None, head_dim=32), None),
    # as Qwen2.5's config.json: a sliding_window value that use_sliding_window=false switches off, and no
    # layer_types (which this transformers version would write, all "full_attention")
    "qwen2": ("qwen2", {}, {"sliding_window": W, "use_sliding_window": False, "max_window_layers": 1,
                            "layer_types": DROP}),
    "gemma3": ("gemma3", dict(rope_parameters=GEMMA_ROPE), None),
    "gemma3_linear": ("gemma3", dict(rope_parameters=GEMMA_ROPE_LINEAR), None),     # Gemma-3 4B and up
    # Gemma-3 config.json in the older layout: rope_theta, rope_local_base_freq, rope_scaling and
    # sliding_window_pattern (every 3rd layer full) instead of rope_parameters and layer_types
    "gemma3_hub_config": ("gemma3", dict(rope_parameters=GEMMA_ROPE_LINEAR),
                          {"rope_parameters": DROP, "layer_types": DROP, "_sliding_window_pattern": DROP,
                           "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                           "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
}


def _ids(n, seed):
    return [int(i) for i in np.random.default_rng(seed).integers(3, 300, n)]


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


class Variant:
    """One tiny model: its Hugging Face directory, the transformers model, and its conversions (made once)."""

    def __init__(self, name, root):
        import torch
        from transformers import AutoModelForCausalLM
        self.torch = torch
        self.name = name
        arch, overrides, edits = VARIANTS[name]
        self.hf_dir = make_tiny_hf(os.path.join(root, name, "hf"), arch, seed=list(VARIANTS).index(name),
                                   config_edits=edits, **overrides)
        self.model = AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()
        self.root = os.path.join(root, name)
        self._qrz, self._logits = {}, {}

    def qrz(self, fmt="f32"):
        if fmt not in self._qrz:
            self._qrz[fmt] = convert(self.hf_dir, os.path.join(self.root, f"{fmt}.qrz"), fmt=fmt, group_size=32,
                                     progress=False)
        return self._qrz[fmt]

    def load(self, fmt="f32", threads=1, ctx=CTX, **kw):
        return pyqrt.load(self.qrz(fmt), threads=threads, ctx=ctx, **kw)

    def logits(self, ids, model=None):
        """transformers' logits for a fresh sequence, (len(ids), n_vocab) float32"""
        key = tuple(ids)
        if model is not None or key not in self._logits:
            with self.torch.no_grad():
                out = (model or self.model)(self.torch.tensor([list(ids)])).logits[0].float().numpy()
            if model is not None:
                return out
            self._logits[key] = out
        return self._logits[key]

    def greedy(self, ids, n):
        """n argmax tokens, recomputing the whole sequence each step (no cache: independent of transformers'
        cache classes), never stopping at EOS; also the smallest gap between the top two logits met on the way,
        relative to the largest logit of its step (the scale rel_err uses)"""
        seq, gap = list(ids), np.inf
        for _ in range(n):
            last = self.logits(seq)[-1]
            top2 = np.sort(last)[-2:]
            gap = min(gap, float((top2[1] - top2[0]) / np.abs(last).max()))
            seq.append(int(np.argmax(last)))
        return seq[len(ids):], gap

    def ablated(self, config_changes=None, mutate=None):
        """the same weights under a changed config, or with mutate(model) applied: what a runtime with that
        mistake would compute"""
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.from_pretrained(self.hf_dir)
        for k, v in (config_changes or {}).items():
            setattr(cfg, k, v)
        cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg, dtype=self.torch.float32).eval()
        model.load_state_dict(self.model.state_dict())
        if mutate:
            with self.torch.no_grad():
                mutate(model)
        return model


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """tiny matrices: one thread is fastest, and never waits for a busy core (with 2 threads on a loaded
    2-core machine this module took minutes instead of seconds)"""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("arch"))
    made = {}

    def get(name):
        if name not in made:
            made[name] = Variant(name, root)
        return made[name]
    return get


def eval_append(m, ids):
    """run ids on top of the cached sequence (qrz_eval appends to it); returns their logits"""
    chunk = np.ascontiguousarray(ids, dtype=np.int32)
    out = np.empty((len(chunk), m.n_vocab), np.float32)
    _native.context_check(m._ctx, lib.qrz_eval(m._ctx, _native.as_c_array(chunk, np.int32), len(chunk),
                                               _native.as_c_array(out, np.float32), 1))
    return out


def eval_chunks(m, ids, sizes):
    """feed a fresh sequence through the KV cache in chunks of the given sizes; every position's logits"""
    assert sum(sizes) == len(ids)
    m.reset()
    bounds = np.cumsum([0] + sizes)
    out = np.concatenate([eval_append(m, ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])])
    assert m.n_past == len(ids)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the oracle itself: the tiny models and configs mean what the tests assume, and the tolerances can see mistakes
# ---------------------------------------------------------------------------------------------------------------

def _minus_one_on_norms(model):      # x * w instead of Gemma's x * (1 + w)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p -= 1


def _unscaled_embeddings(model):
    model.model.embed_tokens.embed_scale.fill_(1.0)


def _zero_biases(model):
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.zero_()


_GEMMA_MISTAKES = {
    "attention scale 1/sqrt(head_dim)": (dict(query_pre_attn_scalar=32), None),
    "window one longer": (dict(sliding_window=W + 1), None),
    "window one shorter": (dict(sliding_window=W - 1), None),
    "sliding layers as full": (dict(layer_types=["full_attention"] * 3), None),
    "norms multiply by w, not 1 + w": (None, _minus_one_on_norms),
    "embeddings not scaled": (None, _unscaled_embeddings),
    "exact GELU": (dict(hidden_activation="gelu"), None),
}
MISTAKES = {
    "llama3": {"RoPE unscaled": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), None),
               "llama3 RoPE without the smoothing band": (dict(rope_parameters=dict(LLAMA3, low_freq_factor=3.999)),
                                                          None)},
    "llama3_hub_config": {"RoPE unscaled": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
                                            None),
                          "rope_theta 10000": (dict(rope_parameters=dict(LLAMA3, rope_theta=10000.0)), None)},
    "llama_linear": {"RoPE unscaled": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), None)},
    "llama_linear_hub_config": {"RoPE unscaled": (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                                                  None)},
    "mistral_swa": {"no window": (dict(sliding_window=None), None),
                    "window one longer": (dict(sliding_window=W + 1), None),
                    "window one shorter": (dict(sliding_window=W - 1), None)},
    "qwen2": {"biases ignored": (None, _zero_biases),
              "sliding_window applied despite use_sliding_window=false": (
                  dict(sliding_window=W, layer_types=["full_attention", "sliding_attention"]), None)},
    "gemma3": dict(_GEMMA_MISTAKES, **{
        "one RoPE base for all layers": (dict(rope_parameters={"full_attention": GEMMA_ROPE["sliding_attention"],
                                                               "sliding_attention": GEMMA_ROPE["sliding_attention"]}),
                                         None),
        "RoPE bases swapped": (dict(rope_parameters={"full_attention": GEMMA_ROPE["sliding_attention"],
                                                     "sliding_attention": GEMMA_ROPE["full_attention"]}), None)}),
    "gemma3_linear": {"global RoPE unscaled": (dict(rope_parameters=GEMMA_ROPE), None),
                      "linear scaling on the local layers too": (
                          dict(rope_parameters={"full_attention": GEMMA_ROPE_LINEAR["full_attention"],
                                                "sliding_attention": dict(GEMMA_ROPE_LINEAR["full_attention"],
                                                                          rope_theta=1e4)}), None)},
    "gemma3_hub_config": {"global RoPE unscaled": (dict(rope_parameters=GEMMA_ROPE), None),
                          "default layer pattern (5 sliding : 1 full)": (dict(layer_types=["sliding_attention"] * 3),
                                                                         None)},
}


@pytest.mark.parametrize("name,mistake", [(v, k) for v, ks in MISTAKES.items() for k in ks])
def test_oracle_catches_each_mistake(variants, name, mistake):
    """each mistake an implementation could make moves transformers' logits far beyond the f32 tolerance, so
    test_logits_f32 would catch it (the logits of a mistaken runtime = transformers with the mistake applied)"""
    v = variants(name)
    changes, mutate = MISTAKES[name][mistake]
    ids = _ids(N_LOGITS, 1)
    err = rel_err(v.logits(ids, v.ablated(changes, mutate)), v.logits(ids))
    assert err > 5 * F32_TOL, f"{name}: '{mistake}' changes the logits by only {err:.2e}"


def test_oracle_reads_hub_configs_as_intended(variants):
    """the older config.json layouts mean to transformers what the native ones do: the same model"""
    for hub, native in [("llama3_hub_config", "llama3"), ("llama_linear_hub_config", "llama_linear"),
                        ("gemma3_hub_config", "gemma3_linear")]:
        cfg = variants(hub).model.config
        rope = {k: v for k, v in cfg.rope_parameters.items() if k != "type"}   # the old key is kept alongside
        assert rope == variants(native).model.config.rope_parameters, hub
        assert getattr(cfg, "layer_types", None) == getattr(variants(native).model.config, "layer_types", None)
    qwen2 = variants("qwen2").model.config
    assert qwen2.sliding_window is None and qwen2.layer_types == ["full_attention"] * 2   # use_sliding_window wins
    assert variants("gemma3_hub_config").model.config.layer_types == ["sliding_attention", "sliding_attention",
                                                                       "full_attention"]


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_oracle_window_semantics(tmp_path, arch):
    """transformers' sliding window W: position p attends to keys p-W+1 .. p (W keys, itself included). Shown on
    a one-layer model: the last position's logits depend on the token W-1 back and not on the one W back."""
    import torch
    from transformers import AutoModelForCausalLM
    extra = dict(layer_types=["sliding_attention"]) if arch == "gemma3" else {}
    hf = make_tiny_hf(tmp_path / "hf", arch, num_hidden_layers=1, sliding_window=W, **extra)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(20, 2)
    p = len(ids) - 1

    def last_logits(seq):
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, -1].numpy()
    base = last_logits(ids)
    for back, seen in [(W - 1, True), (W, False), (W + 3, False)]:
        changed = list(ids)
        changed[p - back] = 3 + (changed[p - back] - 2) % 297
        assert (np.abs(last_logits(changed) - base).max() > 1e-3) == seen, (back, seen)


# ---------------------------------------------------------------------------------------------------------------
# the runtime against the oracle
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_logits_f32(variants, name):
    """every position's logits of a fresh 56-token sequence (7 windows), on every instruction set"""
    v = variants(name)
    ids = _ids(N_LOGITS, 1)
    want = v.logits(ids)
    for isa in ["scalar"] + (["avx2"] if pyqrt.isa_supported("avx2") else []):
        got = v.load(isa=isa, threads=2).logits(ids)
        err = rel_err(got, want)
        assert err < F32_TOL, f"{name} ({isa}): logits differ from transformers by {err:.2e} (relative)"


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_matches_transformers(variants, name):
    """24 greedy tokens after a 40-token prompt (64 tokens, 8 windows) = transformers' argmax decoding"""
    v = variants(name)
    prompt = _ids(N_PROMPT, 2)
    want, gap = v.greedy(prompt, N_GEN)
    # a runtime within the f32 tolerance may only pick another token where the top two are within 2 tolerances:
    # such a near-tie would make the comparison unfair (the seeds here give relative gaps of 5e-4 and more)
    assert gap > 2 * F32_TOL, f"{name}: the oracle's top-2 logits come within {gap:.1e}: pick another seed"
    got = v.load().generate_tokens(prompt, max_tokens=N_GEN, temperature=0.0, ignore_eos=True)
    assert got == want, f"{name}: greedy tokens differ from transformers' from index " \
                        f"{next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))}"


@pytest.mark.parametrize("name", VARIANTS)
def test_small_batches_and_incremental_feeding(variants, name):
    """prompt passes of 5 tokens (chunks straddle the 8-token window), then the sequence fed through the KV
    cache in uneven pieces (single tokens, pieces shorter and longer than the window and than the batch): the
    same logits as transformers' one pass"""
    v = variants(name)
    ids = _ids(N_LOGITS, 1)
    want = v.logits(ids)
    m = v.load(batch=5)
    err = rel_err(m.logits(ids), want)
    assert err < F32_TOL, f"{name}: batch=5 logits differ by {err:.2e}"
    sizes = [1, 2, 5, 1, 8, 3, 9, 1, 7, 16, 3]
    err = rel_err(eval_chunks(m, ids, sizes), want)
    assert err < F32_TOL, f"{name}: logits fed in chunks {sizes} differ by {err:.2e}"
    err = rel_err(eval_chunks(v.load(), ids, [1] * len(ids)), want)
    assert err < F32_TOL, f"{name}: logits fed one token at a time differ by {err:.2e}"


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", VARIANTS)
def test_prefix_reuse_after_rollback(variants, name, batch):
    """generate calls on one model whose prompts share a prefix with the cached sequence (the runtime may reuse
    it and drop the rest) give the tokens of a fresh model. The cache is rolled back by many windows (the case
    a ring-buffer cache for sliding layers gets wrong: the keys of the shared prefix's last window have been
    overwritten), by every amount from 1 to W+2 tokens (wherever a ring's limit lies), and to the same prompt
    again; a pure continuation must reuse the whole cache (Model.chat's promise: a follow-up turn only runs the
    new tokens). Prompt passes of 1 and 5 tokens, since a ring's size may depend on the batch."""
    v = variants(name)
    m, fresh = v.load(batch=batch), v.load()
    other = iter(_ids(400, 3))

    def new(k):
        return [next(other) for _ in range(k)]

    history = []             # the previous prompt and its generated tokens: what m's cache was built from

    def step(prompt, what, n=8):
        nonlocal history
        shared = next((i for i, (a, b) in enumerate(zip(prompt, history)) if a != b), min(len(prompt), len(history)))
        cached = m.n_past
        got = m.generate_tokens(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
        fresh.reset()
        want = fresh.generate_tokens(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
        reused = m.last_timings["n_reused"]
        assert got == want, f"{name}: after {what} (shared prefix {shared}, cache held {cached}, reused {reused}) " \
                            f"the tokens differ from a fresh model's"
        assert reused <= shared, f"{name}: reused {reused} tokens, more than the shared prefix of {shared}"
        history = list(prompt) + got
        return reused, cached

    base = _ids(N_PROMPT, 2)
    step(base, "a first prompt", n=N_GEN)
    step(base[:12] + new(20), "a rollback of 52 tokens (6.5 windows)", n=16)
    reused, cached = step(history + new(5), "a pure continuation")
    assert reused == cached, f"{name}: a continuation of the cached sequence reused {reused} of {cached} tokens"
    for back in list(range(1, W + 3)) + [3 * W + 2]:
        step(history[:len(history) - back] + new(3), f"a rollback of {back} tokens")
    step(list(history[:len(history) - 8]), "the same prompt again")


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", VARIANTS)
def test_rollback_logits(variants, name, batch):
    """the same rollbacks at the precision of logits (a stale key in a window can move logits without changing
    a greedy token): a prompt that shares a prefix with the cache is run by generate with max_tokens=0, then 10
    more tokens are appended with qrz_eval; their logits must be transformers' for the whole sequence"""
    v = variants(name)
    m = v.load(batch=batch)
    fresh = iter(_ids(400, 4))

    def new(k):
        return [next(fresh) for _ in range(k)]

    cached = new(64)
    m.generate_tokens(cached, max_tokens=0)
    for back in list(range(1, W + 3)) + [3 * W + 2, 52]:
        prompt = cached[:len(cached) - back] + new(2)
        m.generate_tokens(prompt, max_tokens=0)
        reused = m.last_timings["n_reused"]
        more = new(W + 2)
        err = rel_err(eval_append(m, more), v.logits(prompt + more)[-len(more):])
        assert err < F32_TOL, f"{name}: after a rollback of {back} tokens (reused {reused} of {len(cached)}) the " \
                              f"logits differ from transformers' by {err:.2e}"
        cached = prompt + more


@pytest.mark.parametrize("fmt,tol", [("f16", F16_TOL), ("q8", Q8_TOL)])
@pytest.mark.parametrize("name", VARIANTS)
def test_quantized_formats_close_to_f32(variants, name, fmt, tol):
    """f16 and q8 (group 32) files load and give logits near transformers' (loose bounds: see the module doc)"""
    v = variants(name)
    ids = _ids(N_LOGITS, 1)
    err = rel_err(v.load(fmt).logits(ids), v.logits(ids))
    assert err < tol, f"{name} {fmt}: logits differ from transformers by {err:.2e}"


def test_gemma3_sliding_layers_cache_only_the_window(tmp_path):
    """with a long context, Gemma-3's sliding layers keep a window-sized cache: two sliding layers and one full
    layer need much less than three full layers (ideally a third plus the windows; asserted: under a half)"""
    hf_mixed = make_tiny_hf(tmp_path / "mixed", "gemma3", rope_parameters=GEMMA_ROPE, max_position_embeddings=4096)
    hf_full = make_tiny_hf(tmp_path / "full", "gemma3", rope_parameters=GEMMA_ROPE, max_position_embeddings=4096,
                           layer_types=["full_attention"] * 3)
    kv = {}
    for label, hf in [("mixed", hf_mixed), ("full", hf_full)]:
        m = pyqrt.load(convert(hf, tmp_path / f"{label}.qrz", fmt="f32", progress=False), threads=1, ctx=4096)
        assert m.n_ctx == 4096
        kv[label] = m.kv_cache_bytes
    assert 0 < kv["mixed"] < 0.5 * kv["full"], kv


# ---------------------------------------------------------------------------------------------------------------
# configurations the converter must refuse, or get right
# ---------------------------------------------------------------------------------------------------------------

REFUSED = {
    "yarn (rope_parameters)": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                             "original_max_position_embeddings": 64}}, "yarn"),
    "dynamic (rope_scaling)": ("llama", {"rope_parameters": DROP, "rope_theta": 1e4,
                                         "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    "longrope": ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                               "long_factor": [2.0] * 8}}, "longrope"),
    "yarn on gemma3's local layers": ("gemma3", {"rope_parameters": {
        "full_attention": GEMMA_ROPE["full_attention"],
        "sliding_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}}, "yarn"),
    "gemma attn_logit_softcapping": ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    "unknown architecture": ("llama", {"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
                             "FalconForCausalLM"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_configs_are_refused(tmp_path, case):
    """ConvertError naming what is unsupported, and no output file"""
    arch, edits, fragment = REFUSED[case]
    hf = make_tiny_hf(tmp_path / "hf", arch, rope_parameters=GEMMA_ROPE if arch == "gemma3" else None)
    edit_config(hf, edits)
    with pytest.raises(ConvertError, match=fragment):
        convert(hf, tmp_path / "out.qrz", fmt="f16", progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.qrz")]


REFUSED_OR_RIGHT = {
    "gemma final_logit_softcapping": ("gemma3", dict(rope_parameters=GEMMA_ROPE, final_logit_softcapping=3.0),
                                      "final_logit_softcapping"),
    "gemma bidirectional attention": ("gemma3", dict(rope_parameters=GEMMA_ROPE, use_bidirectional_attention=True),
                                      "bidirectional"),
    "llama attention_bias": ("llama", dict(attention_bias=True), "bias"),
    "llama mlp_bias": ("llama", dict(mlp_bias=True), "bias"),
    "qwen2 use_sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=W, max_window_layers=1),
                                 "sliding"),
}


@pytest.mark.parametrize("case", REFUSED_OR_RIGHT)
def test_other_features_refused_or_right(tmp_path, case):
    """features beyond the supported set that change the output: the converter either refuses them with a
    ConvertError that names them, or the runtime computes them (logits as transformers'). Silently ignoring
    them is the failure."""
    import torch
    from transformers import AutoModelForCausalLM
    arch, overrides, fragment = REFUSED_OR_RIGHT[case]
    hf = make_tiny_hf(tmp_path / "hf", arch, **overrides)
    try:
        path = convert(hf, tmp_path / "out.qrz", fmt="f32", progress=False)
    except ConvertError as exc:
        assert fragment in str(exc), f"the error does not say what is unsupported: {exc}"
        return
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _ids(N_LOGITS, 1)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    err = rel_err(pyqrt.load(path, threads=2, ctx=CTX).logits(ids), want)
    assert err < F32_TOL, f"{case}: converted without complaint but the logits differ by {err:.2e}"
