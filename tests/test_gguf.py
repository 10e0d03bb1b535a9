"""convert/gguf.py: a llama.cpp GGUF file read as the converter's input (Hugging Face config, tensors and
tokenizer). Checked against the Hugging Face directories transformers made from the very same GGUF files
(tests/assets.py: SmolLM2 = llama arch + byte-level BPE, Gemma-3 = gemma3 + SentencePiece, Qwen2.5 = qwen2 +
byte-level BPE), and on tiny GGUF files written here with gguf.GGUFWriter."""
import json
import os
import re
import tracemalloc

import numpy as np
import pytest

from convert import ConvertError
from convert.gguf import GGUFModel
from convert.hf import TensorSource
from convert.qrzfile import KV
from convert.tokenizer import CONTROL, gpt2_unicode_to_byte, tokenizer_metadata
from pyqrt.tokenizer import Tokenizer
from tests import assets
from tests.conftest import _need_oracle

gguf = pytest.importorskip("gguf")

MODELS = ["smollm2", "gemma3", "qwen25"]
TRICKY = ["", " ", "Hello world", " leading", "  two  spaces   three", "trailing space ", "\n\nnew\nlines\r\n\ttabs",
          "\t\t\tx\n\n\n\n", "emoji 🚀🧪👩‍👩‍👧 done", "東京タワー 中文字符 한국어", "naïve café Ωμέγα", "e\u0301 decomposed",
          "\u200b zero-width", "1234567890 3.14159 2024-01-01", "don't won't I'M", "x" * 300, " " * 31 + "x",
          "<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b", "<|endoftext|><|endoftext|>", "<|im_start",
          "<bos>hi<eos>", "<start_of_turn>user\nhi<end_of_turn>\n", "<unk>x<pad>", "</s> html <b>bold</b></footer>",
          "<tool_call>{}</tool_call>", "[multimodal]", "<0x41> ▁already", "  \n  \n", "💩" * 20]
TEXT_CHARS = 20_000   # of each real text; the start of code.utf8 has no run of more than 31 spaces (see below)


def _plain(meta):
    """metadata as the runtime receives it from a loaded file: KV wrappers unwrapped to Python values"""
    return {k: (v.value if isinstance(v, KV) else v) for k, v in meta.items()}


@pytest.fixture(scope="module")
def opened():
    """factory: model name -> (GGUFModel, Hugging Face directory made from the same GGUF); each GGUF is opened
    once per module (GGUFReader parses every metadata value up front: ~5 s for SmolLM2, ~20 s for Gemma-3)"""
    _need_oracle()
    cache = {}

    def get(name):
        if name not in cache:
            gguf_path, hf_dir, _ = assets.MODELS[name]
            cache[name] = (GGUFModel(gguf_path()), hf_dir())
        return cache[name]
    yield get
    for m, _ in cache.values():
        m.close()


@pytest.fixture(scope="module")
def tokenizers(opened):
    """factory: model name -> (runtime Tokenizer from the GGUF's metadata, the metadata, transformers' tokenizer)"""
    from transformers import AutoTokenizer
    cache = {}

    def get(name):
        if name not in cache:
            m, hf_dir = opened(name)
            meta = _plain(m.tokenizer_metadata())
            cache[name] = Tokenizer.from_metadata(meta), meta, AutoTokenizer.from_pretrained(hf_dir)
        return cache[name]
    return get


# ---- tensors and config against the transformers-made directories ----
@pytest.mark.parametrize("name", MODELS)
def test_tensors_equal_transformers(opened, name):
    """same names, shapes and values as transformers' dequantization of the same file, bitwise: both run the
    GGUF's blocks through the same arithmetic, un-permute llama's q/k rows and subtract Gemma's norm offset"""
    m, hf_dir = opened(name)
    hf = TensorSource(hf_dir)
    try:
        assert set(m.source.names()) == set(hf.names())
        for tensor in m.source.names():
            assert tensor in m.source.where and m.source.dtype(tensor) == "F32"
            assert m.source.shape(tensor) == hf.shape(tensor), tensor
            ours, theirs = m.source.load(tensor), hf.load(tensor)
            assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.flags.writeable
            assert ours.shape == theirs.shape == m.source.shape(tensor), tensor
            assert np.array_equal(ours, theirs), (tensor, m.source.gguf_type(tensor),
                                                  float(np.abs(ours - theirs).max()))
            del ours, theirs
    finally:
        hf.close()


def test_what_was_undone_matters(opened):
    """the two fixes are real: without un-permuting, SmolLM2's q/k rows differ; Gemma's stored norms are 1 + w"""
    m, hf_dir = opened("smollm2")
    entry = m.source.where["model.layers.0.self_attn.k_proj.weight"]
    raw = gguf.quants.dequantize(entry.tensor.data, entry.tensor.tensor_type)
    hf = TensorSource(hf_dir)
    try:
        assert not np.array_equal(raw, hf.load("model.layers.0.self_attn.k_proj.weight"))
        g, g_dir = opened("gemma3")
        ghf = TensorSource(g_dir)
        entry = g.source.where["model.layers.0.self_attn.q_norm.weight"]
        stored = gguf.quants.dequantize(entry.tensor.data, entry.tensor.tensor_type)
        assert np.array_equal(stored - np.float32(1), ghf.load("model.layers.0.self_attn.q_norm.weight"))
        ghf.close()
    finally:
        hf.close()


# keys transformers writes that say nothing about the model (or only matter for a feature the GGUF lacks)
CONFIG_NOISE = {"dtype", "transformers_version", "initializer_range", "use_cache", "max_window_layers"}


@pytest.mark.parametrize("name", MODELS)
def test_config_matches_transformers(opened, name):
    m, hf_dir = opened(name)
    with open(os.path.join(hf_dir, "config.json")) as f:
        theirs = json.load(f)
    ours = m.config
    for key in sorted(set(theirs) - CONFIG_NOISE):
        assert key in ours, key
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    extra = set(ours) - set(theirs)
    assert extra <= {"head_dim"}, extra     # Qwen2's config leaves it implicit
    assert ours["head_dim"] == theirs.get("head_dim", theirs["hidden_size"] // theirs["num_attention_heads"])
    assert json.loads(json.dumps(ours)) == ours    # plain JSON, as config.json would be


def test_gemma3_config_details(opened):
    config = opened("gemma3")[0].config
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert config["rope_parameters"] == {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                         "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert config["query_pre_attn_scalar"] == config["head_dim"] == 256 and config["sliding_window"] == 512
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["final_logit_softcapping"] is None


def test_loading_is_one_tensor_at_a_time(opened):
    """opening dequantizes nothing; a load allocates a small multiple of that one tensor"""
    m, _ = opened("smollm2")
    name = "model.layers.3.mlp.down_proj.weight"
    nbytes = int(np.prod(m.source.shape(name))) * 4
    tracemalloc.start()
    try:
        w = m.source.load(name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert w.nbytes == nbytes and peak < 8 * nbytes, (peak, nbytes)


# ---- tokenizer against transformers' tokenizer of the same GGUF ----
def _check_encode(tok, ref, text):
    for special in (True, False):
        want = ref(text, add_special_tokens=special).input_ids
        got = tok.encode(text, special=special)
        assert got == want, (special, text[:80], next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None))
    return ref(text).input_ids


def _check_decode(tok, ref, ids, control_rendered=True):
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    if control_rendered:
        assert tok.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("source", ["wiki", "c4", "code"])
def test_encode_real_text_matches_transformers(tokenizers, name, source):
    tok, meta, ref = tokenizers(name)
    text = assets.text(source)[:TEXT_CHARS]
    assert not re.search(" {32,}", text)   # Gemma-3 differs there on purpose (test_gemma3_long_space_runs)
    ids = _check_encode(tok, ref, text)
    body = ref(text, add_special_tokens=False).input_ids
    _check_decode(tok, ref, ids, control_rendered=meta["tokenizer.kind"] == "bpe")
    _check_decode(tok, ref, body)
    # what the C detokenizer streams: the bytes of each token, concatenated, are the text
    assert b"".join(tok.token_to_piece(i) for i in body) == text.encode("utf-8")


@pytest.mark.parametrize("name", MODELS)
def test_tricky_strings_match_transformers(tokenizers, name):
    tok, meta, ref = tokenizers(name)
    for text in TRICKY:
        ids = _check_encode(tok, ref, text)
        _check_decode(tok, ref, ids, control_rendered=meta["tokenizer.kind"] == "bpe")
        body = [i for i in ids if meta["tokenizer.token_type"][i] != CONTROL]
        _check_decode(tok, ref, body)
    assert tok.n_vocab == len(ref) and tok.bos_id == ref.bos_token_id and tok.eos_id == ref.eos_token_id
    assert tok.pad_id == ref.pad_token_id


def test_gemma3_decode_renders_control_tokens(tokenizers):
    tok, _, ref = tokenizers("gemma3")
    for text in ("<start_of_turn>user\nhi<end_of_turn>", "<start_of_turn>model\n  two  spaces<end_of_turn>\n<eos>",
                 "héllo <pad>wörld 🚀"):
        ids = ref(text).input_ids
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)


def test_gemma3_is_sentencepiece(tokenizers):
    tok, meta, _ = tokenizers("gemma3")
    assert meta["tokenizer.kind"] == "spm" and "tokenizer.hf_json" not in meta
    assert tok._sp is not None and tok._hf is None
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(meta["tokenizer.spm_model"]))
    assert sp.get_piece_size() == 262144 and sp.bos_id() == 2 and sp.eos_id() == 1 and sp.pad_id() == 0
    assert sp.unk_id() == 3 and sp.encode("  ") == [138] and sp.decode([3]) == "<unk>"
    assert meta["tokenizer.add_bos"] is True and meta["tokenizer.add_eos"] is False


def test_gemma3_long_space_runs(tokenizers):
    """Gemma's runs of 2..31 spaces are user-defined pieces, which SentencePiece (and llama.cpp) match longest
    first: 40 spaces are 31 + 9. transformers' GGUF tokenizer rebuilds BPE merges from the vocabulary instead and
    splits such a run elsewhere (16 + 24); up to 31 spaces the two agree."""
    tok, meta, ref = tokenizers("gemma3")
    run = {n: meta["tokenizer.token_bytes"].index(b" " * n) for n in range(2, 32)}
    for n in range(2, 32):
        assert tok.encode(" " * n + "x", False) == ref(" " * n + "x", add_special_tokens=False).input_ids
    for n, runs in ((40, [31, 9]), (62, [31, 31]), (75, [31, 31, 13])):
        assert tok.encode("a" + " " * n + "b", False)[1:-1] == [run[r] for r in runs], n
    ids = tok.encode("a" + " " * 32 + "b", False)   # a lone last space joins the word, as after one space
    assert ids[1] == run[31] and tok.token_to_piece(ids[2]) == b" b" and len(ids) == 3
    assert tok.encode(" " * 40, False) != ref(" " * 40, add_special_tokens=False).input_ids   # the known split


@pytest.mark.parametrize("name", MODELS)
def test_metadata_agrees_with_the_directory_route(tokenizers, opened, name):
    """the GGUF route and the Hugging Face directory route (convert.tokenizer.tokenizer_metadata) give the same
    special ids, flags, end-of-generation ids, byte table and chat template"""
    tok, meta, _ = tokenizers(name)
    _, hf_dir = opened(name)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_meta = _plain(tokenizer_metadata(hf_dir, json.load(f)))
    for key in ("tokenizer.bos_id", "tokenizer.eos_id", "tokenizer.pad_id", "tokenizer.add_bos",
                "tokenizer.add_eos", "tokenizer.eog_ids", "tokenizer.token_bytes", "tokenizer.clean_up_spaces",
                "tokenizer.chat_template"):
        assert meta.get(key) == hf_meta.get(key), key
    if meta["tokenizer.kind"] == "bpe":
        assert meta["tokenizer.token_type"] == hf_meta["tokenizer.token_type"]
    hf_tok = Tokenizer.from_metadata(hf_meta)
    for text in TRICKY + [assets.text("code")[:3000]]:
        assert tok.encode(text) == hf_tok.encode(text), text


@pytest.mark.parametrize("name", ["smollm2", "qwen25"])
def test_chat_template_from_the_gguf(tokenizers, name):
    tok, meta, ref = tokenizers(name)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for prompt in (True, False):
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=prompt) == want
    assert ref.convert_tokens_to_ids("<|im_end|>") in meta["tokenizer.eog_ids"]


def test_plain_text_markers_do_not_end_generation(tokenizers):
    """"</s>" is an ordinary (HTML) token in Gemma's and Qwen's vocabularies: not an end-of-generation id"""
    for name in ("gemma3", "qwen25"):
        tok, meta, ref = tokenizers(name)
        assert ref.convert_tokens_to_ids("</s>") not in meta["tokenizer.eog_ids"]
    tok, meta, ref = tokenizers("gemma3")
    assert meta["tokenizer.eog_ids"] == [1, 106]   # <eos>, <end_of_turn>


# ---- tiny GGUF files ----
def _permute(w, heads):
    """llama.cpp's q/k row order (forward direction, written here independently): pair j of a head goes from
    rows (j, d/2 + j) to rows (2j, 2j + 1)"""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + d // 2 + j]
    return out


BYTE_TOKENS = sorted(gpt2_unicode_to_byte(), key=gpt2_unicode_to_byte().get)   # the 256 byte-level characters


def write_tiny_gguf(path, arch="llama", n_layers=2, hidden=32, heads=4, kv_heads=2, ff=48, qtype=None,
                    tokenizer=True, rope_freqs=None, extra_tensors=(), seed=0, pre="gpt2", keys=None, tied=False,
                    drop=(), raw=None):
    """a small random model as a GGUF in llama.cpp's conventions; returns the tensors Hugging Face would hold.
    drop: GGUF tensor names left out; raw: name -> (bytes, byte shape or None, GGML type) written instead"""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    tokens = ["<s>", "</s>"] + BYTE_TOKENS
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": n_layers, "context_length": 128, "embedding_length": hidden,
                       "feed_forward_length": ff, "attention.head_count": heads,
                       "attention.head_count_kv": kv_heads}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    if arch == "gemma3":
        w.add_uint32("gemma3.attention.key_length", head_dim)
        w.add_uint32("gemma3.attention.sliding_window", 16)
    for key, (kind, value) in (keys or {}).items():
        getattr(w, f"add_{kind}")(key, value)
    if tokenizer:
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", pre)
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.token_type", [3, 3] + [1] * 256)
        w.add_array("tokenizer.ggml.merges", [])
        w.add_uint32("tokenizer.ggml.bos_token_id", 0)
        w.add_uint32("tokenizer.ggml.eos_token_id", 1)

    hf = {}

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def put(gg_name, hf_name, value, stored=None):
        stored = value if stored is None else stored
        if gg_name in drop:
            pass
        elif gg_name in (raw or {}):
            data, shape, kind = raw[gg_name]
            w.add_tensor(gg_name, data, raw_shape=shape, raw_dtype=kind)
        elif qtype == gguf.GGMLQuantizationType.F16 and stored.ndim == 2:
            w.add_tensor(gg_name, stored.astype(np.float16))
            value = value.astype(np.float16).astype(np.float32)
        elif qtype is not None and stored.ndim == 2:
            # quantization blocks run along rows, so quantizing commutes with llama.cpp's row permutation
            w.add_tensor(gg_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            value = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        else:
            w.add_tensor(gg_name, stored)
        hf[hf_name] = value

    def norm(gg_name, hf_name, size):
        v = (0.1 * rng.standard_normal(size)).astype(np.float32)
        if arch == "gemma3":   # stored as 1 + w; w comes back as (1 + w) - 1, rounded as transformers rounds it
            put(gg_name, hf_name, (v + np.float32(1)) - np.float32(1), v + np.float32(1))
        else:
            put(gg_name, hf_name, v)

    put("token_embd.weight", "model.embed_tokens.weight", mat(vocab, hidden))
    for i in range(n_layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        q, k = mat(heads * head_dim, hidden), mat(kv_heads * head_dim, hidden)
        permuted = arch == "llama"
        put(b + "attn_q.weight", p + "self_attn.q_proj.weight", q, _permute(q, heads) if permuted else None)
        put(b + "attn_k.weight", p + "self_attn.k_proj.weight", k, _permute(k, kv_heads) if permuted else None)
        put(b + "attn_v.weight", p + "self_attn.v_proj.weight", mat(kv_heads * head_dim, hidden))
        put(b + "attn_output.weight", p + "self_attn.o_proj.weight", mat(hidden, heads * head_dim))
        put(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", mat(ff, hidden))
        put(b + "ffn_up.weight", p + "mlp.up_proj.weight", mat(ff, hidden))
        put(b + "ffn_down.weight", p + "mlp.down_proj.weight", mat(hidden, ff))
        norm(b + "attn_norm.weight", p + "input_layernorm.weight", hidden)
        if arch == "gemma3":
            norm(b + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", hidden)
            norm(b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", hidden)
            norm(b + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", hidden)
            norm(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", head_dim)
            norm(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", head_dim)
        else:
            norm(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", hidden)
        if arch == "qwen2":
            for x, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                put(f"{b}attn_{x}.bias", f"{p}self_attn.{x}_proj.bias",
                    rng.standard_normal(rows * head_dim).astype(np.float32))
    norm("output_norm.weight", "model.norm.weight", hidden)
    if not tied:
        put("output.weight", "lm_head.weight", mat(vocab, hidden))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for gg_name, value in extra_tensors:
        w.add_tensor(gg_name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("qtype", [None, "F16", "BF16", "Q8_0", "Q4_0", "Q5_1"])
def test_tiny_models_read_back_as_hugging_face(tmp_path, arch, qtype):
    """names, shapes and values for each architecture (llama: q/k un-permuted with 4 query and 2 kv heads;
    gemma3: norms minus one), from F32, F16, BF16, Q8_0, Q4_0 and Q5_1 storage (K-quants: the real models)"""
    qt = getattr(gguf.GGMLQuantizationType, qtype) if qtype else None
    hidden = 32
    want = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, qtype=qt, hidden=hidden, ff=64 if qt else 48)
    with GGUFModel(tmp_path / "m.gguf") as m:
        assert set(m.source.names()) == set(want)
        for name, value in want.items():
            assert m.source.shape(name) == value.shape, name
            got = m.source.load(name)
            assert np.array_equal(got, value.astype(np.float32)), (name, float(np.abs(got - value).max()))
        c = m.config
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, hidden // 4)
        assert c["tie_word_embeddings"] is False and c["vocab_size"] == 258 and c["rms_norm_eps"] == np.float32(1e-6)
        assert c["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "gemma3": "Gemma3ForCausalLM"}[arch]]


def test_tiny_tied_embeddings(tmp_path):
    want = write_tiny_gguf(tmp_path / "tied.gguf", tied=True)
    with GGUFModel(tmp_path / "tied.gguf") as m:
        assert m.config["tie_word_embeddings"] is True and "lm_head.weight" not in m.source.where
        assert np.array_equal(m.source.load("model.embed_tokens.weight"), want["model.embed_tokens.weight"])


def _llama3_table(theta, head_dim, factor, low, high, original=8192):
    out = []
    for j in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (j / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            s = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, np.float32)


@pytest.mark.parametrize("factor,low,high", [(32.0, 1.0, 4.0), (8.0, 1.0, 4.0), (16.0, 2.0, 8.0)])
def test_llama3_rope_freqs_become_rope_parameters(tmp_path, factor, low, high):
    head_dim = 64
    write_tiny_gguf(tmp_path / "m.gguf", hidden=256, heads=4, kv_heads=2,
                    rope_freqs=_llama3_table(500000.0, head_dim, factor, low, high))
    with GGUFModel(tmp_path / "m.gguf") as m:
        rope = m.config["rope_parameters"]
        assert "rope_freqs.weight" not in m.source.where
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert rope["factor"] == pytest.approx(factor) and rope["original_max_position_embeddings"] == 8192
    assert rope["low_freq_factor"] == pytest.approx(low, rel=1e-3)
    assert rope["high_freq_factor"] == pytest.approx(high, rel=1e-3)


def test_unmappable_rope_freqs_is_a_clear_error(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", hidden=256, rope_freqs=np.linspace(3.0, 1.0, 32))
    with pytest.raises(ConvertError, match="rope_freqs.*not supported"):
        GGUFModel(tmp_path / "m.gguf")


def test_linear_rope_scaling_is_recorded(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", arch="gemma3", keys={"gemma3.rope.scaling.type": ("string", "linear"),
                                                              "gemma3.rope.scaling.factor": ("float32", 8.0)})
    with GGUFModel(tmp_path / "m.gguf") as m:
        assert m.config["rope_parameters"]["full_attention"] == {"rope_theta": 500000.0, "rope_type": "linear",
                                                                 "factor": 8.0}
        assert m.config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0


def test_tiny_byte_level_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    with GGUFModel(tmp_path / "m.gguf") as m:
        meta = _plain(m.tokenizer_metadata())
    tok = Tokenizer.from_metadata(meta)
    assert meta["tokenizer.kind"] == "bpe" and meta["tokenizer.add_bos"] is False
    for text in ["hello world", "東京 🚀", " a</s>b"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("x</s>y")[1] == 1 and meta["tokenizer.token_type"][:2] == [CONTROL, CONTROL]


# ---- SentencePiece rebuilt from a GGUF vocabulary, against the original sentencepiece model ----
def _train_bpe_spm(vocab_size=400, add_dummy_prefix=True):
    import io

    import sentencepiece as spm
    from tests.tiny import TEXT
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 8 + ["    indented\tcode();", "a  b   c"]),
                                   model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   user_defined_symbols=["<tool>"], add_dummy_prefix=add_dummy_prefix)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _spm_gguf(path, sp, add_space_prefix=True):
    """a GGUF whose vocabulary is the sentencepiece model's, as llama.cpp's converter writes it"""
    n = sp.get_piece_size()
    types = []
    for i in range(n):
        types.append(3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
                     else 4 if sp.id_to_piece(i) == "<tool>" else 1)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "context_length": 64, "embedding_length": 16, "feed_forward_length": 16,
                       "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)])
    w.add_array("tokenizer.ggml.scores", [sp.get_score(i) for i in range(n)])
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.bos_token_id", sp.bos_id())
    w.add_uint32("tokenizer.ggml.eos_token_id", sp.eos_id())
    w.add_uint32("tokenizer.ggml.unknown_token_id", sp.unk_id())
    w.add_bool("tokenizer.ggml.add_space_prefix", add_space_prefix)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n, 16)).astype(np.float32))
    for name, shape in (("attn_q", (16, 16)), ("attn_k", (16, 16)), ("attn_v", (16, 16)), ("attn_output", (16, 16)),
                        ("ffn_gate", (16, 16)), ("ffn_up", (16, 16)), ("ffn_down", (16, 16)), ("attn_norm", (16,)),
                        ("ffn_norm", (16,))):
        w.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_model_rebuilt_from_gguf_tokenizes_like_the_original(tmp_path):
    """Llama-2 / TinyLlama style: BPE by score, byte fallback, a dummy prefix; the protobuf is written by hand"""
    sp = _train_bpe_spm()
    _spm_gguf(tmp_path / "m.gguf", sp)
    with GGUFModel(tmp_path / "m.gguf") as m:
        meta = _plain(m.tokenizer_metadata())
    assert meta["tokenizer.kind"] == "spm" and meta["tokenizer.add_bos"] is True
    tok = Tokenizer.from_metadata(meta)
    import sentencepiece
    rebuilt = sentencepiece.SentencePieceProcessor(model_proto=bytes(meta["tokenizer.spm_model"]))
    assert [rebuilt.id_to_piece(i) for i in range(sp.get_piece_size())] == \
        [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for text in ["The quick brown fox", "東京 café 🚀 ✓ unseen ∑ chars", "  two  spaces", "    indented\tcode();",
                 "a<tool>b", "\n\nlines\n", "1234567890", ""]:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.encode(text, special=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text
    assert meta["tokenizer.token_bytes"][sp.piece_to_id("<0x0A>")] == b"\n"


def test_sentencepiece_without_dummy_prefix(tmp_path):
    """tokenizer.ggml.add_space_prefix false (Gemma style): no leading ▁, as a model trained that way"""
    sp = _train_bpe_spm(add_dummy_prefix=False)
    _spm_gguf(tmp_path / "m.gguf", sp, add_space_prefix=False)
    with GGUFModel(tmp_path / "m.gguf") as m:
        tok = Tokenizer.from_metadata(_plain(m.tokenizer_metadata()))
    for text in ["quick fox", " quick", "  two  spaces", "東京 🚀"]:
        assert tok.encode(text, special=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    assert not tok.token_to_piece(tok.encode("quick", special=False)[0]).startswith(b" ")


# ---- bad input: a ConvertError that says what is wrong ----
def test_not_a_gguf(tmp_path):
    for content in (b"", b"GGU", b"hello, world: not a model file at all", b"{\"model\": 1}" * 10):
        p = tmp_path / "x.gguf"
        p.write_bytes(content)
        with pytest.raises(ConvertError, match="not a GGUF file"):
            GGUFModel(p)
    with pytest.raises(ConvertError, match="does not exist"):
        GGUFModel(tmp_path / "missing.gguf")
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(64))
    with pytest.raises(ConvertError, match="version 9"):
        GGUFModel(p)


def test_truncated_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf")
    raw = (tmp_path / "m.gguf").read_bytes()
    header_end = raw.index(b"token_embd.weight")   # in the tensor directory
    for cut in (10, 30, 200, header_end, header_end + 40, len(raw) // 2, len(raw) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(raw[:cut])
        with pytest.raises(ConvertError, match="truncated|corrupt") as info:
            GGUFModel(p)
        assert str(p) in str(info.value)


def test_truncated_real_gguf(tmp_path):
    src = assets.smollm2_gguf()
    with open(src, "rb") as f:
        head = f.read(4 << 20)   # metadata and directory complete, tensor data cut short
    p = tmp_path / "cut.gguf"
    p.write_bytes(head)
    with pytest.raises(ConvertError, match="truncated"):
        GGUFModel(p)


def test_unsupported_architecture(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(ConvertError, match=r"architecture 'mamba'.*supported: llama, qwen2, gemma3"):
        GGUFModel(tmp_path / "m.gguf")


def test_missing_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", tokenizer=False)
    with pytest.raises(ConvertError, match="no tokenizer"):
        GGUFModel(tmp_path / "m.gguf")


def test_unsupported_pre_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", pre="chatglm-bpe")
    with pytest.raises(ConvertError, match="pre-tokenizer 'chatglm-bpe'.*supported:.*qwen2"):
        GGUFModel(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path):
    q81 = gguf.GGMLQuantizationType.Q8_1   # a type the gguf package can describe but not dequantize
    block, size = gguf.GGML_QUANT_SIZES[q81]
    ff, hidden = 64, 32
    write_tiny_gguf(tmp_path / "m.gguf", ff=ff, raw={"blk.1.ffn_up.weight": (
        np.zeros((ff, hidden // block * size), np.uint8), None, q81)})
    with pytest.raises(ConvertError, match="blk.1.ffn_up.weight.*Q8_1.*cannot dequantize"):
        GGUFModel(tmp_path / "m.gguf")


def test_unknown_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", extra_tensors=[("blk.0.attn_qkv.weight", np.zeros((96, 32), np.float32))])
    with pytest.raises(ConvertError, match="blk.0.attn_qkv.weight.*no Hugging Face counterpart"):
        GGUFModel(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", drop={"blk.1.attn_v.weight"})
    with pytest.raises(ConvertError, match="model.layers.1.self_attn.v_proj.weight"):
        GGUFModel(tmp_path / "m.gguf")


def test_smollm2_from_gguf_scores_as_from_its_directory(smollm2_qrz, wiki_text):
    """`python -m convert model.gguf`: the same tensors (CRC-32 of every stored tensor) and the same perplexity as
    converting the Hugging Face directory transformers made from that GGUF"""
    import pyqrt
    from_dir = smollm2_qrz("q8")
    from_gguf = assets.converted(assets.smollm2_gguf(), "smollm2-135m-from-gguf", "q8")
    crcs = [{t["name"]: (t["type"], t["shape"], t["crc32"]) for t in pyqrt.open_file(p).tensors}
            for p in (from_dir, from_gguf)]
    assert crcs[0] == crcs[1]
    a, b = pyqrt.load(from_dir, ctx=512), pyqrt.load(from_gguf, ctx=512)
    ids = a.tokenize(wiki_text[:20_000])[:2048]
    assert b.tokenize(wiki_text[:20_000])[:2048] == ids
    ppl_dir, ppl_gguf = a.perplexity(ids, window=512), b.perplexity(ids, window=512)
    print(f"SmolLM2 q8, wiki {len(ids)} tokens / 512: from directory {ppl_dir:.6f}, from GGUF {ppl_gguf:.6f}")
    assert ppl_gguf == ppl_dir
