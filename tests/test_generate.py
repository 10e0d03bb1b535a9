"""The C token loop on a real model: streaming, stop strings, sampling statistics, seeds, chat cache reuse."""
import math

import numpy as np
import pytest

import pyqrt


@pytest.fixture(scope="module")
def model(smollm2_qrz):
    return pyqrt.load(smollm2_qrz("q8"), threads=2, ctx=1024)


PROMPT = "The history of the city of Paris"


def test_stream_equals_whole_text(model):
    whole = model.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True)
    pieces = list(model.generate(PROMPT, max_tokens=40, temperature=0, ignore_eos=True, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert model.last_timings["n_generated"] == 40 and model.last_timings["finish"] == "length"


def test_text_equals_detokenized_tokens(model):
    ids = model.generate_tokens(model.tokenize(PROMPT), max_tokens=30)
    text = model.generate(PROMPT, max_tokens=30, temperature=0, ignore_eos=True)
    assert text == model.detokenize(ids)


def test_greedy_is_argmax_of_logits(model):
    prompt = model.tokenize(PROMPT)
    got = model.generate_tokens(prompt, max_tokens=8)
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(np.argmax(model.logits(seq)[-1])))
    assert got == seq[len(prompt):]


def test_stop_string_cuts_before_it(model):
    full = model.generate(PROMPT, max_tokens=60, temperature=0, ignore_eos=True)
    words = full.split()
    assert len(words) > 6
    stop = " " + words[5]
    cut = model.generate(PROMPT, max_tokens=60, temperature=0, ignore_eos=True, stop=[stop, "\x00never"])
    assert cut == full[:full.index(stop)]
    assert model.last_timings["finish"] == "stop"
    streamed = "".join(model.generate(PROMPT, max_tokens=60, temperature=0, ignore_eos=True, stop=stop, stream=True))
    assert streamed == cut


def test_seeded_sampling_is_reproducible(model):
    a = model.generate(PROMPT, max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    b = model.generate(PROMPT, max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    c = model.generate(PROMPT, max_tokens=24, temperature=1.0, seed=999, ignore_eos=True)
    assert a == b
    assert a != c


def _next_token_probs(model, ids, temperature=1.0):
    logits = model.logits(ids)[-1].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def _draws(model, ids, n, **sampling):
    return [model.generate_tokens(ids, max_tokens=1, seed=s, **sampling)[0] for s in range(n)]


def test_sampling_follows_softmax(model):
    ids = model.tokenize("My favourite colour is")
    p = _next_token_probs(model, ids)
    draws = np.array(_draws(model, ids, 400, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0))
    for tok in np.argsort(-p)[:3]:
        freq = np.mean(draws == tok)
        sigma = math.sqrt(p[tok] * (1 - p[tok]) / len(draws))
        assert abs(freq - p[tok]) < 4 * sigma + 1e-3, (tok, freq, p[tok])


def test_truncation_samplers_limit_the_candidates(model):
    ids = model.tokenize("My favourite colour is")
    p = _next_token_probs(model, ids)
    order = np.argsort(-p)
    assert set(_draws(model, ids, 60, temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)) <= set(order[:2].tolist())
    allowed = set(np.nonzero(p >= 0.3 * p.max())[0].tolist())
    assert set(_draws(model, ids, 60, temperature=1.0, top_k=0, top_p=1.0, min_p=0.3)) <= allowed
    nucleus = int(np.searchsorted(np.cumsum(p[order]), 0.5) + 1)
    assert set(_draws(model, ids, 60, temperature=1.0, top_k=0, top_p=0.5, min_p=0.0)) <= set(order[:nucleus].tolist())
    assert _draws(model, ids, 5, temperature=1.0, top_k=1) == [int(order[0])] * 5


def test_repeat_penalty_changes_greedy_choice(model):
    prompt = "one two three one two three one two three one two"
    plain = model.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True)
    penalized = model.generate(prompt, max_tokens=6, temperature=0, ignore_eos=True, repeat_penalty=5.0)
    assert plain != penalized


def test_closing_a_stream_early_stops_and_leaves_the_model_usable(model):
    it = model.generate(PROMPT, max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    first = next(it)
    it.close()
    assert first
    assert model.generate(PROMPT, max_tokens=3, temperature=0, ignore_eos=True)


def test_max_tokens_zero_gives_nothing(model):
    assert model.generate(PROMPT, max_tokens=0) == ""


def test_chat_reuses_the_cache_between_turns(model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = model.chat(messages, max_tokens=24, temperature=0)
    assert model.last_timings["finish"] in ("stop", "length")
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Italy?"}]
    model.chat(messages, max_tokens=8, temperature=0)
    t = model.last_timings
    assert t["n_reused"] > 0.5 * t["n_prompt"], t
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_chat_stops_at_end_of_turn(model):
    reply = model.chat([{"role": "user", "content": "Say hello."}], max_tokens=200, temperature=0)
    assert model.last_timings["finish"] == "stop", (reply, model.last_timings)


def test_unicode_prompts_round_trip(model):
    text = "Ünïcödé — 東京 🚀 naïve café"
    assert model.detokenize(model.tokenize(text, special=False)) == text
    pieces = list(model.generate("東京は", max_tokens=20, temperature=0, ignore_eos=True, stream=True))
    # pieces are whole characters; only the very end may hold a character cut short by max_tokens
    assert pieces and "\ufffd" not in "".join(pieces)[:-1]


def test_scoring_windows_predict_every_token_once_behind_bos():
    from pyqrt.model import scoring_windows
    ids = list(range(10))
    assert scoring_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert scoring_windows(ids, 4, bos=99) == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8], [99, 9]]
    assert scoring_windows(ids[:9], 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]     # a lone last token predicts nothing
    assert scoring_windows([], 4, bos=99) == []


def test_perplexity_reads_each_window_behind_bos_when_the_tokenizer_adds_it(model, monkeypatch):
    ids = model.tokenize(PROMPT + " is a long one, and it is told here in a few sentences. " * 4, special=False)
    plain = model.perplexity(ids, window=16)
    monkeypatch.setattr(model.tokenizer, "add_bos", True)
    bos = model.tokenizer.bos_id
    want = np.concatenate([model.score([bos] + ids[s:s + 15]) for s in range(0, len(ids), 15)])
    assert len(want) == len(ids)
    assert model.perplexity(ids, window=16) == pytest.approx(math.exp(want.mean()), rel=1e-12)
    assert model.perplexity(ids, window=16) != pytest.approx(plain, rel=1e-6)
