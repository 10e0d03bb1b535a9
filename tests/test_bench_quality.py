"""The pure-Python parts of bench/quality.py on fabricated inputs: no model, no download."""
import gzip
import json
import math

import numpy as np
import pytest

from bench import quality
from tests import assets


# ---- request files ----

def _row(doc_id, idx, context, choices, gold, request_context=None):
    return {"request_type": "loglikelihood",
            "doc": {"query": context, "choices": choices, "gold": gold},
            "request": {"context": request_context or context, "continuation": " " + choices[idx]},
            "idx": idx, "task_name": "fake", "doc_id": doc_id, "native_id": f"n{doc_id}", "label": gold}


def _write(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_read_olmo_requests_groups_choices_and_drops_unconditioned(tmp_path):
    q0 = ("Question: 2+2?\nAnswer:", ["four", "five", "six"], 0)
    q1 = ("Goal: open a jar\nAnswer:", ["twist the lid", "hit it"], 1)
    rows = [
        _row(1, 1, *q1), _row(0, 2, *q0), _row(0, 0, *q0),      # out of order on purpose
        _row(1_000_000, 0, *q0, request_context="Answer:"),        # unconditioned copies: skipped
        _row(1_000_001, 1, *q1, request_context="Answer:"),
        _row(0, 1, *q0), _row(1, 0, *q1),
    ]
    path = tmp_path / "requests.jsonl.gz"
    _write(path, rows)
    docs = assets.read_olmo_requests(str(path))
    assert [d["doc_id"] for d in docs] == [0, 1]
    assert docs[0]["context"] == q0[0]
    assert docs[0]["continuations"] == [" four", " five", " six"]
    assert docs[0]["choices"] == ["four", "five", "six"]
    assert docs[0]["gold"] == 0 and docs[0]["native_id"] == "n0"
    assert docs[1]["continuations"] == [" twist the lid", " hit it"] and docs[1]["gold"] == 1


@pytest.mark.parametrize("bad", ["missing_choice", "context_mismatch", "gold_out_of_range"])
def test_read_olmo_requests_refuses_inconsistent_files(tmp_path, bad):
    q = ("Q?\nAnswer:", ["a", "b", "c"], 1)
    rows = [_row(0, 0, *q), _row(0, 1, *q), _row(0, 2, *q)]
    if bad == "missing_choice":
        del rows[1]
    elif bad == "context_mismatch":
        rows[2]["request"]["context"] = "Other?\nAnswer:"
    else:
        for r in rows:
            r["label"] = 3
    path = tmp_path / "bad.jsonl.gz"
    _write(path, rows)
    with pytest.raises(assets.AssetError):
        assets.read_olmo_requests(str(path))


# ---- scoring ----

def test_continuation_logprob_sums_the_right_rows_and_tokens():
    rng = np.random.default_rng(0)
    vocab, ctx, cont = 11, [3, 4, 5], [7, 2]
    logits = rng.normal(size=(len(ctx) + len(cont), vocab)).astype(np.float32)
    # row i predicts token i+1: the continuation's tokens are predicted by rows 2 and 3
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(axis=1, keepdims=True)
    want = math.log(probs[2, 7]) + math.log(probs[3, 2])
    assert quality.continuation_logprob(logits, len(ctx), cont) == pytest.approx(want, rel=1e-12)


def test_log_softmax_is_float64_and_stable():
    rows = np.array([[1000.0, 1000.0, -1000.0], [0.0, 1e-9, 0.0]], dtype=np.float32)
    lp = quality.log_softmax64(rows)
    assert lp.dtype == np.float64
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0)
    assert lp[0, 0] == pytest.approx(math.log(0.5))


def test_pick_takes_the_highest_loglikelihood_and_normalizes_by_length():
    ll = [-12.0, -9.0, -10.0]
    assert quality.pick(ll) == 1
    # per character: -12/24 = -0.5 beats -9/10 = -0.9 and -10/5 = -2
    assert quality.pick(ll, [24, 10, 5]) == 0
    assert quality.pick([-3.0, -3.0]) == 0                    # ties: the first


def test_score_questions_counts_acc_and_acc_norm_separately():
    docs = [
        {"doc_id": 0, "context": "c0", "continuations": [" aaaaaaaaaa", " b"], "choices": ["aaaaaaaaaa", "b"],
         "gold": 0},
        {"doc_id": 1, "context": "c1", "continuations": [" x", " y"], "choices": ["x", "y"], "gold": 1},
    ]
    table = {("c0", " aaaaaaaaaa"): -5.0, ("c0", " b"): -2.0,      # acc picks b (wrong), acc_norm picks a (right)
             ("c1", " x"): -1.0, ("c1", " y"): -0.5}               # both pick y (right)
    r = quality.score_questions(docs, lambda c, ks: [table[(c, k)] for k in ks])
    assert r["n"] == 2
    assert r["acc"] == 0.5 and r["acc_norm"] == 1.0
    assert [q["pick"] for q in r["questions"]] == [1, 1]
    assert [q["pick_norm"] for q in r["questions"]] == [0, 1]
    assert r["acc_ci95"] == pytest.approx(1.959964 * math.sqrt(0.25 / 2), rel=1e-6)
    assert r["acc_norm_ci95"] == 0.0


def test_acc_norm_divides_by_the_answer_without_its_leading_space():
    # per answer character: -3/2 = -1.5 < -4/3 = -1.33 picks "abc"; counting the space (-3/3 vs -4/4) would tie
    # and pick "ab"
    docs = [{"doc_id": 0, "context": "c", "continuations": [" ab", " abc"], "choices": ["ab", "abc"], "gold": 1}]
    table = {" ab": -3.0, " abc": -4.0}
    r = quality.score_questions(docs, lambda c, ks: [table[k] for k in ks])
    assert r["questions"][0]["pick"] == 0 and r["questions"][0]["pick_norm"] == 1


def test_binomial_interval():
    p, half = quality.binomial_ci95(50, 200)
    assert p == 0.25 and half == pytest.approx(1.959964 * math.sqrt(0.25 * 0.75 / 200), rel=1e-6)


# ---- tokenization split (a fake word-level tokenizer with a BOS and a merge across a boundary) ----

class FakeTokenizer:
    BOS = 1

    def __init__(self, add_bos=True, add_eos=False):
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab = {}

    def __call__(self, text, special=True):
        # words keep their leading space; "Answer: yes" is one token when whole, like a BPE merge
        pieces, i = [], 0
        text = text.replace("Answer: yes", "Answer:_yes")
        while i < len(text):
            j = i + 1
            while j < len(text) and text[j] != " ":
                j += 1
            pieces.append(text[i:j])
            i = j
        ids = [self.vocab.setdefault(p, 10 + len(self.vocab)) for p in pieces]
        return ([self.BOS] if special and self.add_bos else []) + ids + ([2] if special and self.add_eos else [])


def test_split_request_joint_with_bos():
    tok = FakeTokenizer()
    ctx, cont, joint = quality.split_request(tok, "The cat", " sat down")
    assert joint
    assert ctx == [1] + tok("The cat", False)
    assert cont == tok(" sat down", False)


def test_split_request_moves_trailing_space_and_drops_eos():
    tok = FakeTokenizer(add_bos=False, add_eos=True)
    ctx, cont, joint = quality.split_request(tok, "The cat ", "sat")
    assert joint and ctx == tok("The cat", False) and cont == tok(" sat", False)


def test_split_request_falls_back_when_tokens_merge_across_the_boundary():
    tok = FakeTokenizer()
    ctx, cont, joint = quality.split_request(tok, "Q\nAnswer:", " yes")
    assert not joint
    assert ctx == [1] + tok("Q\nAnswer:", False)
    assert cont == tok(" yes", False)


# ---- bits per weight, configs ----

def test_linear_bits_counts_only_attention_and_mlp_matrices():
    tensors = [
        {"name": "model.embed_tokens.weight", "shape": (1000, 64), "nbytes": 128000},
        {"name": "lm_head.weight", "shape": (1000, 64), "nbytes": 128000},
        {"name": "model.layers.0.self_attn.q_norm.weight", "shape": (64,), "nbytes": 256},
        {"name": "model.layers.0.input_layernorm.weight", "shape": (64,), "nbytes": 256},
        # 4.5 bits: 64x64 at 4 bits + a 16-bit scale per 32 -> 64*64*4.5/8 bytes
        {"name": "model.layers.0.self_attn.q_proj.weight", "shape": (64, 64), "nbytes": 64 * 64 * 9 // 16},
        # 8.5 bits
        {"name": "model.layers.0.mlp.down_proj.weight", "shape": (64, 192), "nbytes": 64 * 192 * 17 // 16},
    ]
    bits, nbytes, elements = quality.linear_bits(tensors)
    assert elements == 64 * 64 + 64 * 192
    assert nbytes == 64 * 64 * 9 // 16 + 64 * 192 * 17 // 16
    assert bits == pytest.approx((4096 * 4.5 + 12288 * 8.5) / 16384)
    with pytest.raises(ValueError):
        quality.linear_bits(tensors[:4])


def test_parse_config_and_load_options():
    assert quality.parse_config("q8") == {"format": "q8", "act": None, "kv": None}
    assert quality.parse_config("sdr:4bit:4bit") == {"format": "sdr", "act": "4bit", "kv": "4bit"}
    assert quality.parse_config("int4:-:f16") == {"format": "int4", "act": None, "kv": "f16"}
    for bad in ("", "sdr:2bit", "sdr:8bit:3bit", "a:b:c:d"):
        with pytest.raises(ValueError):
            quality.parse_config(bad)
    assert quality.load_options(None, None) == {}
    assert quality.load_options("8bit", None) == {"act": "8bit"}
    assert quality.load_options(None, "4bit") == {"kv": "4bit"}


def test_expand_runs_float_formats_once_and_delta_uses_the_default_f16_row():
    configs = [quality.parse_config(c) for c in ("f16", "q8", "sdr:4bit")]
    runs = quality.expand(["gemma3"], configs, [32, 64])
    assert runs == [("gemma3", "f16", None, None, None), ("gemma3", "q8", 32, None, None),
                    ("gemma3", "q8", 64, None, None), ("gemma3", "sdr", 32, "4bit", None),
                    ("gemma3", "sdr", 64, "4bit", None)]
    rows = [{"model": "gemma3", "format": "f16", "group": None, "act": None, "kv": "8bit", "ppl": 11.0},
            {"model": "gemma3", "format": "f16", "group": None, "act": None, "kv": None, "ppl": 10.0}]
    assert quality.reference(rows, "gemma3") is rows[1]
    assert quality.reference(rows, "qwen25") is None


def test_speed_bench_reads_act_suffixes():
    from bench import speed
    assert speed.split_act("m.qrz:4bit") == ("m.qrz", "4bit")
    assert speed.split_act("m.qrz:8bit") == ("m.qrz", "8bit")
    assert speed.split_act("m.qrz") == ("m.qrz", None)
    assert speed.split_act("sdr@16:4bit") == ("sdr@16", "4bit")
    assert speed.split_act("dir:with:colons/m.qrz") == ("dir:with:colons/m.qrz", None)


# ---- bench/paired.py ----

def test_paired_split_spec():
    from bench import paired
    assert paired.split_spec("m.qrz:4bit") == ("m.qrz", "4bit")
    assert paired.split_spec("dir:x/m.qrz") == ("dir:x/m.qrz", None)
    assert paired.split_spec("m.qrz") == ("m.qrz", None)


def test_paired_difference_and_its_block_standard_error():
    from bench import paired
    rng = np.random.default_rng(3)
    b = rng.exponential(3.0, 4096)
    # a constant shift: the mean is the shift and every block agrees, so no error
    m, se = paired.paired(b + 0.25, b, 512)
    assert abs(m - 0.25) < 1e-12 and se < 1e-12
    # block means known by construction: the standard error is their sample std / sqrt(blocks)
    shifts = np.repeat(np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]), 512)
    m, se = paired.paired(b + shifts, b, 512)
    assert abs(m - 0.35) < 1e-12
    assert abs(se - np.std(np.arange(8) / 10, ddof=1) / math.sqrt(8)) < 1e-12
    # a tail shorter than a block counts in the mean, not in the blocks
    m, _ = paired.paired(np.r_[b, [1.0] * 10] + 0.0, np.r_[b, [0.0] * 10], 512)
    assert abs(m - 10 / 4106) < 1e-12
    with pytest.raises(ValueError):
        paired.paired(b[:600], b[:600], 512)


def test_paired_kl_rows_against_a_direct_sum():
    from bench import paired
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 50)) * 4, rng.standard_normal((3, 50)) * 4
    p, q = np.exp(a) / np.exp(a).sum(1, keepdims=True), np.exp(b) / np.exp(b).sum(1, keepdims=True)
    ref_logp = quality.log_softmax64(a)
    np.testing.assert_allclose(paired.kl_rows(ref_logp, b), (p * np.log(p / q)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(paired.kl_rows(ref_logp, a + 3.0), 0.0, atol=1e-12)   # a shift is no change
    assert np.all(paired.kl_rows(ref_logp, b) > 0)


def test_paired_rejects_bad_arguments(tmp_path):
    from bench import paired
    f = tmp_path / "m.qrz"
    f.write_bytes(b"")
    for bad in (["--tokens", "600"], ["--kld", "100"], ["--window", "1"]):
        with pytest.raises(SystemExit):
            paired.main([str(f), str(f)] + bad)
    with pytest.raises(SystemExit):
        paired.main([str(f), str(tmp_path / "missing.qrz")])
    with pytest.raises(SystemExit):
        paired.main([str(f), str(f), "--pair", str(f), "other.qrz"])


def test_paired_text_ids_skip_and_other_texts(monkeypatch, tmp_path):
    from bench import paired
    from tests import assets
    texts = {"wiki": "abcdefghijklmnopqrstuvwxyz" * 4, "c4": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    monkeypatch.setattr(assets, "text", lambda name: texts[name])

    class Chars:   # one token per character
        def tokenize(self, text, special=False):
            return [ord(ch) for ch in text]
    m = Chars()
    assert paired.text_ids(m, 5) == [ord(c) for c in "abcde"]
    assert paired.text_ids(m, 5, "wiki", 3) == [ord(c) for c in "defgh"]
    assert paired.text_ids(m, 4, "c4", 20) == [ord(c) for c in "UVWX"]
    with pytest.raises(ValueError, match="fewer than"):
        paired.text_ids(m, 10, "c4", 20)
    f = tmp_path / "m.qrz"
    f.write_bytes(b"")
    with pytest.raises(SystemExit):
        paired.main([str(f), str(f), "--skip", "-1"])
