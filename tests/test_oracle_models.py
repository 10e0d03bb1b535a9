"""Gemma-3-270M and Qwen2.5-Coder-0.5B-Instruct against transformers: logits, greedy continuations, perplexity.

Gemma-3 is the model whose weights do not sit on a 32-wide 4-bit grid (a Q4_K_M GGUF: 256-wide super-blocks,
several types), and the one with sliding-window layers: every sequence here is longer than its 512-token window,
so the ring-buffer cache of the sliding layers is exercised, in prefill and in decoding past position 512.
"""
import numpy as np
import pytest

import pyqrt
from tests import assets
from tests.conftest import Oracle, _need_oracle

# a passage of wiki.utf8 the tests never tune on (the first 3000 tokens are for perplexity; prompts come after)
HELD_OUT_FROM = 200_000

MODELS = {
    # name: perplexity window, long-prompt tokens (a decode that runs past the sliding window when there is one)
    "gemma3": {"window": 1024, "long_prompt": 500},
    "qwen25": {"window": 1024, "long_prompt": 300},
}
SHORT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                 "Photosynthesis is the process by which"]


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    _need_oracle()
    name = request.param
    hf = assets.MODELS[name][1]()
    return name, hf, MODELS[name]


@pytest.fixture(scope="module")
def oracle16(case):
    return Oracle(case[1], case[0], weights="f16")


@pytest.fixture(scope="module")
def qrz(case):
    return lambda fmt: assets.model_qrz(case[0], fmt)


@pytest.fixture(scope="module")
def long_prompt(oracle16, wiki_text, case):
    return oracle16.tokenize(wiki_text[HELD_OUT_FROM:HELD_OUT_FROM + 20_000])[:case[2]["long_prompt"]]


def test_tokenizer_matches_transformers(oracle16, qrz, wiki_text, c4_text):
    model = pyqrt.load(qrz("f16"), ctx=256)
    for text in (wiki_text[:30_000], c4_text[:30_000], "  leading spaces\n\n\ttabs  and émojis 🚀 <bos> 12345"):
        for special in (True, False):
            assert model.tokenize(text, special=special) == oracle16.tokenize(text, special=special)


def test_f16_logits_match_transformers(oracle16, qrz, long_prompt):
    # transformers holds the same float16-rounded matrices (computing in float32, as pyqrt does for f16), so only
    # summation order differs: observed max |diff| 2.2e-4 (Gemma-3, logits up to ~40, 500 tokens across its
    # 512-token window) and 9e-5 (Qwen2.5). A wrong window, RoPE base, norm or scale moves logits by whole units.
    model = pyqrt.load(qrz("f16"), ctx=1024)
    ref = oracle16.logits(long_prompt)
    out = model.logits(long_prompt)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 5e-3
    assert (out.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("prompt", range(len(SHORT_PROMPTS)))
def test_f16_greedy_matches_transformers(oracle16, qrz, prompt):
    # an instruct model gets its prompt through its chat template
    model = pyqrt.load(qrz("f16"), ctx=1024)
    text = SHORT_PROMPTS[prompt]
    if model.tokenizer.chat_template:
        text = model.apply_chat_template([{"role": "user", "content": text}])
    ids = oracle16.tokenize(text)
    assert model.tokenize(text) == ids
    assert model.generate_tokens(ids, max_tokens=32) == oracle16.greedy_cached(ids, 32)


def test_f16_greedy_past_the_sliding_window(oracle16, qrz, long_prompt):
    # Gemma-3: the prompt ends just before position 512 and decoding runs past it, where the sliding layers'
    # rings start overwriting; the first call's cache is then reused for a prompt that shares its prefix
    model = pyqrt.load(qrz("f16"), ctx=1024, batch=128)
    n = 40
    first = model.generate_tokens(long_prompt, max_tokens=n)
    assert first == oracle16.greedy_cached(long_prompt, n)
    shorter = long_prompt[:-8]
    again = model.generate_tokens(shorter, max_tokens=n)
    assert model.last_timings["n_reused"] > 0 if "n_reused" in model.last_timings else True
    fresh = pyqrt.load(qrz("f16"), ctx=1024, batch=128).generate_tokens(shorter, max_tokens=n)
    assert again == fresh


@pytest.mark.slow
def test_f16_perplexity_within_half_a_percent(case, qrz, wiki_text):
    # against transformers with the original float32 weights; 4096 tokens of wiki in windows of 1024, so half of
    # every window is scored by Gemma-3's sliding layers past their 512-token span
    oracle = Oracle(case[1], case[0])
    ids = oracle.tokenize(wiki_text[:40_000], special=False)[:4096]
    window = case[2]["window"]
    want = oracle.perplexity(ids, window)
    del oracle
    got = pyqrt.load(qrz("f16"), ctx=window).perplexity(ids, window=window)
    print(f"{case[0]} wiki {len(ids)} tokens, window {window}: transformers f32 {want:.4f}, pyqrt f16 {got:.4f}")
    assert abs(got / want - 1) < 0.005


def test_sliding_layers_keep_only_their_window(qrz):
    # a sliding layer's cache holds its window plus one batch (so a batch can be written before it is read);
    # a global layer's holds the whole context
    ctx, batch = 8192, 256
    model = pyqrt.load(qrz("f16"), ctx=ctx, batch=batch)
    meta = model.metadata
    row = 2 * 4 * meta["model.n_kv_heads"] * meta["model.head_dim"]          # k and v, float32
    window = meta.get("model.sliding_window", 0)
    sliding = list(meta.get("model.sliding_layers", [0] * meta["model.n_layers"]))
    slots = [min(ctx, window + batch) if s else ctx for s in sliding]
    assert model.kv_cache_bytes == row * sum(slots)
    if window:
        assert model.kv_cache_bytes < 0.3 * row * ctx * meta["model.n_layers"]
