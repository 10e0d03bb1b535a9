"""End to end against transformers (the oracle, tests/conftest.py) on SmolLM2-135M-Instruct:
Hugging Face directory -> `python -m convert` -> .qrz -> C runtime, through the public API only.

Perplexity convention, identical on both sides (pyqrt's Model.perplexity and Oracle.window_nll): the text is
tokenized with special=False (no BOS), the first 8192 tokens are cut into non-overlapping windows of 512, each
window is scored as a fresh sequence (its first token is context only, tokens 1..511 are predicted), and
perplexity is exp of the mean negative log-likelihood over all 8192 - 16 predicted tokens.
"""
import numpy as np
import pytest

import pyqrt
from tests import assets

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "Liste des départements français: Ain, Aisne, Allier,",
]
GREEDY_TOKENS = 32
PPL_TOKENS, PPL_WINDOW = 8192, 512
# relative perplexity tolerance per format: f32 and f16 must agree to rounding; q8 is int8 absmax, groups of 32
PPL_TOLERANCE = {"f32": 0.005, "f16": 0.005, "q8": 0.03}


@pytest.fixture(scope="module")
def f32_model(smollm2_qrz):
    return pyqrt.load(smollm2_qrz("f32"), threads=2, ctx=2048)


@pytest.fixture(scope="module")
def wiki_ids(oracle, wiki_text):
    """the first PPL_TOKENS tokens of wiki.utf8, no BOS (a prefix of the text is enough to get them)"""
    ids = oracle.tokenize(wiki_text[:200_000], special=False)[:PPL_TOKENS]
    assert len(ids) == PPL_TOKENS
    return ids


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_f32_greedy_matches_transformers(oracle, f32_model, prompt):
    ids = oracle.tokenize(prompt)
    assert f32_model.tokenize(prompt) == ids
    want = oracle.greedy_cached(ids, GREEDY_TOKENS)
    got = f32_model.generate_tokens(ids, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, (f"first difference at generated token {first}: pyqrt {got[first:first + 4]} "
                         f"transformers {want[first:first + 4]}")


def test_f32_logits_match_transformers(oracle, f32_model):
    ids = oracle.tokenize(PROMPTS[2] + " " + PROMPTS[4])
    want = oracle.logits(ids)
    got = f32_model.logits(ids)
    assert got.shape == want.shape == (len(ids), f32_model.n_vocab) and got.dtype == np.float32
    err, scale = float(np.abs(got - want).max()), float(np.abs(want).max())
    print(f"\nf32 logits over {len(ids)} positions: max |pyqrt - transformers| = {err:.3g}, max |logit| = {scale:.3g}")
    assert err < 1e-3 * scale, (err, scale)
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["f32", "f16", "q8"])
def test_perplexity_matches_transformers(oracle, smollm2_qrz, wiki_ids, fmt):
    want = oracle.perplexity(wiki_ids, PPL_WINDOW)
    model = pyqrt.load(smollm2_qrz(fmt), threads=2, ctx=PPL_WINDOW)
    got = model.perplexity(wiki_ids, window=PPL_WINDOW)
    rel = got / want - 1
    print(f"\nwiki.utf8 first {PPL_TOKENS} tokens, windows of {PPL_WINDOW}: transformers {want:.4f}, "
          f"pyqrt {fmt} {got:.4f} ({rel * 100:+.3f}%, tolerance {PPL_TOLERANCE[fmt] * 100:.1f}%)")
    assert abs(rel) <= PPL_TOLERANCE[fmt], (fmt, got, want)


@pytest.mark.slow
def test_perplexity_from_text_equals_from_ids(smollm2_qrz, wiki_text):
    model = pyqrt.load(smollm2_qrz("q8"), threads=2, ctx=256)
    text = wiki_text[:3000]
    ids = model.tokenize(text, special=False)
    assert model.perplexity(text, window=256) == pytest.approx(model.perplexity(ids, window=256), rel=1e-12)
    assert model.perplexity(text, window=256, max_tokens=300) == \
        pytest.approx(model.perplexity(ids[:300], window=256), rel=1e-12)


def test_chat_greedy_matches_transformers(oracle, f32_model):
    """model.chat at temperature 0: the model's own template, greedy tokens, stop at an end-of-turn id"""
    tok = oracle.tokenizer
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three primary colors."}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = oracle.tokenize(prompt, special=False)
    want = oracle.greedy_cached(ids, 48)
    eog = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    cut = next((i for i, t in enumerate(want) if t in eog), len(want))
    got = f32_model.chat(messages, max_tokens=48, temperature=0)
    assert got == tok.decode(want[:cut], skip_special_tokens=True)
    assert f32_model.last_timings["finish"] == ("stop" if cut < len(want) else "length")


@pytest.mark.parametrize("name", ["wiki", "c4"])
def test_tokenizer_from_qrz_matches_transformers_on_real_text(oracle, smollm2_qrz, name):
    """the tokenizer as stored in the .qrz and read back by the runtime (tests/test_tokenizer.py checks the
    converter's metadata; this checks the file round trip)"""
    tok = oracle.tokenizer
    model = pyqrt.load(smollm2_qrz("q8"), threads=1, ctx=64)
    text = assets.text(name)[:100_000]
    lines = text.split("\n")
    for chunk in ("\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)):
        assert model.tokenize(chunk) == tok(chunk).input_ids
        assert model.tokenize(chunk, special=False) == tok(chunk, add_special_tokens=False).input_ids
    ids = model.tokenize(text, special=False)
    assert model.detokenize(ids) == tok.decode(ids)


def test_tokenizer_from_qrz_matches_transformers_on_tricky_text(oracle, f32_model):
    tok = oracle.tokenizer
    for s in ["", " ", "  leading and trailing  ", "emoji 🚀🔥 and CJK 東京都 and ümlauts", "tabs\tand\nnew\n\nlines",
              "<|im_start|>system\nspecial tokens in text<|im_end|>", "x" * 500, "1234567890 3.14159 -42",
              "mixed\r\nline endings\r", "\u200b zero width \ufeff bom"]:
        assert f32_model.tokenize(s) == tok(s).input_ids, s
        assert f32_model.detokenize(tok(s).input_ids) == tok.decode(tok(s).input_ids), s


def test_chat_template_matches_transformers(oracle, f32_model):
    tok = oracle.tokenizer
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"}]):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert f32_model.apply_chat_template(messages) == want
