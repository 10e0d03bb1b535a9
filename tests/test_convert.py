"""The converter on tiny random models: layouts, dtypes, shards, streaming, metadata, and the runtime's
forward pass against transformers on a model that is not a real checkpoint (no 4-bit grid to hide behind)."""
import importlib.util
import os
import tracemalloc

import numpy as np
import pytest

import pyqrt
from convert import convert
from convert.formats import f16, q8
from convert.hf import TensorSource
from convert.tokenizer import gpt2_unicode_to_byte
from tests.tiny import bf16_to_f32, make_tiny_llama

needs_oracle = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("torch", "transformers")),
                                  reason="needs torch and transformers (test-only oracle)")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "hf")


def test_q8_layout_and_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    w[2] = 0
    buf = q8.quantize(w, 32)
    assert buf.nbytes == q8.nbytes(6, 96, 32) == 64 + 6 * 96
    d = buf[:6 * 3 * 2].view("<f2").astype(np.float32).reshape(6, 3)
    np.testing.assert_allclose(d, (np.abs(w.reshape(6, 3, 32)).max(-1) / 127).astype(np.float16).astype(np.float32))
    assert not buf[36:64].any()                      # scale plane padding is zero
    deq = q8.dequantize(buf, 6, 96, 32)
    assert np.all(np.abs(deq - w) <= 0.5 * np.repeat(d, 32, axis=1) * 1.001 + 1e-12)
    assert not deq[2].any()


def test_f16_roundtrip_is_numpy_cast():
    w = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32) * 100
    np.testing.assert_array_equal(f16.dequantize(f16.quantize(w), 3, 5), w.astype(np.float16).astype(np.float32))


def test_bf16_and_shards_read_exactly(tmp_path):
    a = make_tiny_llama(tmp_path / "f32", seed=3)
    b = make_tiny_llama(tmp_path / "bf16", seed=3, dtype="BF16", shards=3)
    sa, sb = TensorSource(a), TensorSource(b)
    assert sorted(sa.names()) == sorted(sb.names()) and len(sb.files) == 3
    for name in sa.names():
        x = sa.load(name)
        bits = (x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1)) >> 16
        np.testing.assert_array_equal(sb.load(name), bf16_to_f32(bits.astype(np.uint16)))
    sa.close()
    sb.close()


def test_metadata_and_tensors(tiny_hf, tmp_path):
    path = convert(tiny_hf, tmp_path / "t.qrz", fmt="q8", group_size=16, progress=False)
    f = pyqrt.open_file(path)
    m = f.metadata
    assert m["general.architecture"] == "llama" and m["quant.format"] == "q8" and m["quant.group_size"] == 16
    assert (m["model.n_embd"], m["model.n_layers"], m["model.n_heads"], m["model.n_kv_heads"]) == (64, 2, 4, 2)
    assert m["model.tie_embeddings"] is False
    assert m["tokenizer.kind"] == "bpe" and "<|im_start|>" in m["tokenizer.chat_template"]
    assert m["tokenizer.eos_id"] == m["tokenizer.eog_ids"][0]
    types = {t["name"]: (t["type"], t["group_size"]) for t in f.tensors}
    assert types["model.layers.0.self_attn.q_proj.weight"] == ("q8", 16)
    assert types["model.norm.weight"] == ("f32", 0) and types["lm_head.weight"] == ("q8", 16)
    assert all(t["offset"] % 64 == 0 for t in f.tensors)
    assert os.path.getsize(path) == f.file_size


def test_token_bytes_reproduce_decoding(tiny_hf, tmp_path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tiny_hf, "tokenizer.json"))
    path = convert(tiny_hf, tmp_path / "t.qrz", fmt="f32", progress=False)
    m = pyqrt.load(path, threads=1)
    for text in ["Hello world!", "東京 café 🚀", "def f(x):\n    return x"]:
        ids = tok.encode(text).ids
        assert m.detokenize(ids) == text
        # the C table (token_bytes) gives the same bytes, token by token
        from pyqrt import _native
        assert _native.detokenize(m.file._handle, ids) == text.encode()
    assert len(gpt2_unicode_to_byte()) == 256 and sorted(gpt2_unicode_to_byte().values()) == list(range(256))


def test_streaming_keeps_memory_near_one_tensor(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf", n_layers=8, hidden=256, ff=512)
    total = sum(os.path.getsize(os.path.join(hf, n)) for n in os.listdir(hf) if n.endswith(".safetensors"))
    tracemalloc.start()
    convert(hf, tmp_path / "t.qrz", fmt="q8", group_size=32, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    largest = 300 * 256 * 4       # the largest tensor (an embedding) as float32
    # a handful of temporaries of the largest tensor (quantization), never the model
    assert peak < min(8 * largest, total / 5), (peak, total)


@needs_oracle
@pytest.mark.parametrize("fmt,tol", [("f32", 1e-4), ("f16", 2e-2), ("q8", 5e-2)])
def test_tiny_logits_match_transformers(tiny_hf, tmp_path, fmt, tol):
    import torch
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ids = list(range(3, 60))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    for isa in ["scalar"] + (["avx2"] if pyqrt.isa_supported("avx2") else []):
        m = pyqrt.load(convert(tiny_hf, tmp_path / f"t-{fmt}.qrz", fmt=fmt, group_size=16, progress=False),
                       threads=2, isa=isa, batch=16)
        got = m.logits(ids)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < tol, (isa, err)
        # decoding token by token through the KV cache gives the same logits as one batched pass
        m.reset()
        step = [m.logits(ids[:k + 1])[-1] for k in (10, 30)]
        np.testing.assert_allclose(step[0], got[10], rtol=1e-4, atol=1e-4 * np.abs(got).max())
        np.testing.assert_allclose(step[1], got[30], rtol=1e-4, atol=1e-4 * np.abs(got).max())


def _train_spm(path, vocab_size=316):
    import io

    import sentencepiece as spm
    from tests.tiny import TEXT
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 8), model_writer=model, vocab_size=vocab_size,
                                   byte_fallback=True, character_coverage=0.9995, minloglevel=2, hard_vocab_limit=False,
                                   user_defined_symbols=["<|im_end|>"])
    with open(path, "wb") as f:
        f.write(model.getvalue())


def test_sentencepiece_only_tokenizer(tmp_path):
    """a model with tokenizer.model and no tokenizer.json (Llama-2 style): encoded through sentencepiece with
    the model's BOS policy; the C byte table renders <0xNN> byte pieces and the ▁ space marker"""
    import sentencepiece as spm
    hf = make_tiny_llama(tmp_path / "hf", vocab=316)
    import os as _os
    _os.unlink(_os.path.join(hf, "tokenizer.json"))
    _train_spm(_os.path.join(hf, "tokenizer.model"))
    sp = spm.SentencePieceProcessor(model_file=_os.path.join(hf, "tokenizer.model"))
    m = pyqrt.load(convert(hf, tmp_path / "spm.qrz", fmt="f32", progress=False), threads=1)
    assert m.metadata["tokenizer.kind"] == "spm" and m.metadata["tokenizer.add_bos"] is True
    for text in ["The quick brown fox", "東京 café 🚀 ✓ unseen ∑ chars", "  two  spaces"]:
        ids = m.tokenize(text)
        assert ids == [sp.bos_id()] + sp.encode(text)
        assert m.tokenize(text, special=False) == sp.encode(text)
        assert m.detokenize(ids[1:]) == sp.decode(ids[1:])
        from pyqrt import _native
        # sentencepiece drops the leading space its dummy prefix adds; the byte table keeps it
        assert _native.detokenize(m.file._handle, ids[1:]).decode("utf-8")[1:] == sp.decode(ids[1:])
