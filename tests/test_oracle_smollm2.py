"""End to end against transformers (the oracle) on SmolLM2-135M-Instruct: HF directory -> .qrz -> C runtime.

Perplexity convention, identical on both sides: the text is tokenized without BOS, the first 8192 tokens are cut
into non-overlapping windows of 512, each window is scored as a fresh sequence (its first token is context
only), and perplexity is exp of the mean negative log-likelihood over all predicted tokens.
"""
import hashlib
import json
import math
import os

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
]
PPL_TOKENS, PPL_WINDOW = 8192, 512


@pytest.fixture(scope="module")
def oracle(smollm2_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    return model, tok


@pytest.fixture(scope="module")
def f32_model(smollm2_qrz):
    return pyqrt.load(smollm2_qrz("f32"), threads=2, ctx=2048)


def _oracle_greedy(oracle, ids, n):
    """plain argmax decoding with transformers' KV cache, never stopping at EOS (like ignore_eos)"""
    import torch
    model, _ = oracle
    out, past, step = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(step, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(torch.argmax(res.logits[0, -1]))
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_f32_greedy_matches_transformers(oracle, f32_model, prompt):
    _, tok = oracle
    ids = tok(prompt).input_ids
    assert f32_model.tokenize(prompt) == ids
    want = _oracle_greedy(oracle, ids, 32)
    got = f32_model.generate_tokens(ids, max_tokens=32, ignore_eos=True)
    assert got == want


def test_f32_logits_match_transformers(oracle, f32_model):
    import torch
    model, tok = oracle
    ids = tok(PROMPTS[2]).input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = f32_model.logits(ids)
    assert got.shape == want.shape == (len(ids), f32_model.n_vocab)
    err = np.abs(got - want).max()
    assert err < 1e-3 * np.abs(want).max(), err


def _ppl_ids(text, tok):
    return tok(text[:200_000], add_special_tokens=False).input_ids[:PPL_TOKENS]


def _oracle_ppl(oracle, ids, hf_dir):
    """transformers' perplexity by the module's convention, cached on disk by model and token hash"""
    key = hashlib.sha256(json.dumps([os.path.abspath(hf_dir), ids, PPL_WINDOW]).encode()).hexdigest()[:16]
    path = os.path.join(assets.CACHE, f"oracle-ppl-{key}.json")
    if os.path.exists(path):
        return json.load(open(path))["ppl"]
    import torch
    model, _ = oracle
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), PPL_WINDOW):
            window = torch.tensor([ids[start:start + PPL_WINDOW]])
            if window.shape[1] < 2:
                break
            logp = torch.log_softmax(model(window).logits[0].double(), dim=-1)
            nll = -logp[:-1].gather(1, window[0, 1:, None])[:, 0]
            total += float(nll.sum())
            count += len(nll)
    ppl = math.exp(total / count)
    with open(path, "w") as f:
        json.dump({"ppl": ppl}, f)
    return ppl


@pytest.mark.parametrize("fmt,tolerance", [("f32", 0.005), ("f16", 0.005), ("q8", 0.03)])
def test_perplexity_matches_transformers(oracle, smollm2_hf_dir, smollm2_qrz, wiki_text, fmt, tolerance):
    _, tok = oracle
    ids = _ppl_ids(wiki_text, tok)
    assert len(ids) == PPL_TOKENS
    want = _oracle_ppl(oracle, ids, smollm2_hf_dir)
    model = pyqrt.load(smollm2_qrz(fmt), threads=2, ctx=PPL_WINDOW)
    got = model.perplexity(ids, window=PPL_WINDOW)
    print(f"\nwiki.utf8 first {PPL_TOKENS} tokens, windows of {PPL_WINDOW}: transformers {want:.4f}, "
          f"pyqrt {fmt} {got:.4f} ({(got / want - 1) * 100:+.3f}%)")
    assert abs(got / want - 1) <= tolerance


def test_perplexity_from_text_equals_from_ids(smollm2_qrz, wiki_text):
    model = pyqrt.load(smollm2_qrz("q8"), threads=2, ctx=256)
    text = wiki_text[:3000]
    ids = model.tokenize(text, special=False)
    assert model.perplexity(text, window=256) == pytest.approx(model.perplexity(ids, window=256), rel=1e-12)


@pytest.mark.parametrize("name", ["wiki", "c4"])
def test_tokenizer_matches_transformers_on_real_text(oracle, smollm2_qrz, name):
    _, tok = oracle
    model = pyqrt.load(smollm2_qrz("q8"), threads=1, ctx=64)
    text = assets.text(name)[:300_000]
    lines = text.split("\n")
    chunks = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    for chunk in chunks:
        assert model.tokenize(chunk) == tok(chunk).input_ids
        assert model.tokenize(chunk, special=False) == tok(chunk, add_special_tokens=False).input_ids
    ids = model.tokenize(text, special=False)
    assert model.detokenize(ids) == tok.decode(ids)


def test_tokenizer_matches_transformers_on_tricky_text(oracle, f32_model):
    _, tok = oracle
    for s in ["", " ", "  leading and trailing  ", "emoji 🚀🔥 and CJK 東京都 and ümlauts", "tabs\tand\nnew\n\nlines",
              "<|im_start|>system\nspecial tokens in text<|im_end|>", "x" * 500, "1234567890 3.14159 -42",
              "mixed\r\nline endings\r", "\u200b zero width \ufeff bom"]:
        assert f32_model.tokenize(s) == tok(s).input_ids, s
        assert f32_model.detokenize(tok(s).input_ids) == tok.decode(tok(s).input_ids), s


def test_chat_template_matches_transformers(oracle, f32_model):
    _, tok = oracle
    for messages in ([{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"}]):
        want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert f32_model.apply_chat_template(messages) == want
