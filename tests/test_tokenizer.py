"""The tokenizer, both sides: the tokenizer.* metadata the converter writes (convert/tokenizer.py) and the runtime
Tokenizer built from it (pyqrt/tokenizer.py), on small tokenizers trained here and against transformers on the
real SmolLM2 directory (fixture; skipped when it is unavailable)."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from convert import ConvertError
from convert.qrzfile import KV
from convert.tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED, gpt2_unicode_to_byte, tokenizer_metadata
from pyqrt.errors import TokenizerError
from pyqrt.tokenizer import Tokenizer
from tests.tiny import TEXT, make_tiny_llama

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers (test-only oracle)")

TRICKY = ["", " ", "Hello world", "  two  spaces   three", "\n\nnew\nlines\r\n\ttabs", "emoji 🚀🧪👩‍👩‍👧 done",
          "東京タワー 中文字符 한국어", "naïve café Ωμέγα", "<|im_start|>user\nhi<|im_end|>\n", "a<|im_end|>b",
          "<|endoftext|><|endoftext|>", "x" * 300, "1234567890 3.14159", "don't won't I'm", "\u200b zero-width",
          "<|im_start", "trailing space "]


def _plain(meta):
    """metadata as the runtime receives it from a loaded file: KV wrappers unwrapped to Python values"""
    return {k: (v.value if isinstance(v, KV) else v) for k, v in meta.items()}


def _hf_dir_with_tokenizer(tmp_path, tokenizer_config=None, config=None):
    hf = make_tiny_llama(tmp_path / "hf")
    if tokenizer_config is not None:
        with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f)
    if config is not None:
        cfg = json.load(open(os.path.join(hf, "config.json")))
        json.dump(dict(cfg, **config), open(os.path.join(hf, "config.json"), "w"))
    return hf


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tok") / "hf")


@pytest.fixture(scope="module")
def tiny_meta(tiny_hf):
    return _plain(tokenizer_metadata(tiny_hf, json.load(open(os.path.join(tiny_hf, "config.json")))))


# ---- converter side ----
def test_gpt2_byte_map_is_the_inverse_of_byte_level():
    from tokenizers import pre_tokenizers
    to_byte = gpt2_unicode_to_byte()
    assert sorted(to_byte.values()) == list(range(256))
    assert set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet())
    assert to_byte["Ġ"] == 0x20 and to_byte["Ċ"] == 0x0A and to_byte["A"] == 0x41


def test_byte_level_token_bytes_reproduce_decode(tiny_hf, tiny_meta):
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(os.path.join(tiny_hf, "tokenizer.json"))
    pieces, types = tiny_meta["tokenizer.token_bytes"], tiny_meta["tokenizer.token_type"]
    assert tiny_meta["tokenizer.kind"] == "bpe" and len(pieces) == len(types) == hf.get_vocab_size()
    for i, piece in enumerate(pieces):
        text = hf.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:     # a lone token that is part of a UTF-8 sequence decodes to U+FFFD
            assert piece == text.encode("utf-8"), i
    for text in TEXT + TRICKY:      # and any text is the concatenation of its tokens' bytes
        assert b"".join(pieces[i] for i in hf.encode(text).ids) == text.encode("utf-8"), text
    ids = {t: hf.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert all(types[i] == CONTROL for i in ids.values()) and types[hf.token_to_id("Ġ")] == NORMAL
    assert tiny_meta["tokenizer.bos_id"] == ids["<|im_start|>"] and tiny_meta["tokenizer.eos_id"] == ids["<|im_end|>"]
    assert set(tiny_meta["tokenizer.eog_ids"]) == {ids["<|im_end|>"], ids["<|endoftext|>"], 2}
    assert (tiny_meta["tokenizer.add_bos"], tiny_meta["tokenizer.add_eos"]) == (False, False)
    assert json.loads(tiny_meta["tokenizer.hf_json"]) == json.load(open(os.path.join(tiny_hf, "tokenizer.json")))


def test_sentencepiece_style_tokenizer_json(tmp_path):
    """a Metaspace + byte-fallback tokenizer.json (Llama-2 / Gemma style): kind spm, ▁ -> space, <0xNN> -> byte"""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    # as in Llama-2's tokenizer.json: specials first, then the 256 byte pieces, then the learned pieces
    vocab = {p: i for i, p in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken("<tool>", special=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = make_tiny_llama(tmp_path / "hf")
    tok.save(os.path.join(hf, "tokenizer.json"))
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_eos_token": True}, f)
    meta = _plain(tokenizer_metadata(hf, {}))
    pieces, types = meta["tokenizer.token_bytes"], meta["tokenizer.token_type"]
    assert meta["tokenizer.kind"] == "spm" and "tokenizer.spm_model" not in meta
    assert pieces[tok.token_to_id("<0x0A>")] == b"\n" and types[tok.token_to_id("<0xE6>")] == BYTE
    assert types[tok.token_to_id("<s>")] == CONTROL and types[tok.token_to_id("<tool>")] == USER_DEFINED
    spaced = [p for p in tok.get_vocab() if p.startswith("▁") and len(p) > 1]
    assert spaced and all(pieces[tok.token_to_id(p)] == p.replace("▁", " ").encode() for p in spaced)
    # the post-processor decides (transformers ignores add_*_token when there is a tokenizer.json)
    assert (meta["tokenizer.add_bos"], meta["tokenizer.add_eos"]) == (True, False)
    assert meta["tokenizer.bos_id"] == tok.token_to_id("<s>")
    runtime = Tokenizer.from_metadata(meta)
    assert runtime.encode("hello world")[0] == tok.token_to_id("<s>")
    assert runtime.encode("hello world", special=False) == tok.encode("hello world", add_special_tokens=False).ids


def test_special_ids_from_config_and_generation_config(tmp_path):
    hf = _hf_dir_with_tokenizer(tmp_path, tokenizer_config={}, config={"bos_token_id": 1, "eos_token_id": [2, 0]})
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 5]}, f)
    meta = _plain(tokenizer_metadata(hf, json.load(open(os.path.join(hf, "config.json")))))
    assert (meta["tokenizer.bos_id"], meta["tokenizer.eos_id"], meta["tokenizer.pad_id"]) == (1, 2, -1)
    assert meta["tokenizer.eog_ids"][:3] == [2, 0, 5]
    assert "tokenizer.chat_template" not in meta


def test_chat_template_sources(tmp_path):
    hf = _hf_dir_with_tokenizer(tmp_path, tokenizer_config={"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]})
    assert tokenizer_metadata(hf, {})["tokenizer.chat_template"] == "DEFAULT"
    with open(os.path.join(hf, "chat_template.jinja"), "w") as f:
        f.write("FROM FILE")
    assert tokenizer_metadata(hf, {})["tokenizer.chat_template"] == "FROM FILE"


def test_broken_tokenizer_json_is_a_convert_error(tmp_path):
    hf = make_tiny_llama(tmp_path / "hf")
    with open(os.path.join(hf, "tokenizer.json"), "w") as f:
        f.write('{"model": ')
    with pytest.raises(ConvertError, match="tokenizer.json"):
        tokenizer_metadata(hf, {})


# ---- runtime side ----
def test_runtime_encode_decode(tiny_hf, tiny_meta):
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(os.path.join(tiny_hf, "tokenizer.json"))
    tok = Tokenizer.from_metadata(tiny_meta)
    assert tok.n_vocab == hf.get_vocab_size() and tok.bos_id == hf.token_to_id("<|im_start|>")
    for text in TEXT + TRICKY:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids == tok.encode(text, special=False)
        assert tok.decode(ids) == text
    im_end = hf.token_to_id("<|im_end|>")
    assert tok.encode("a<|im_end|>b").count(im_end) == 1         # special strings in text are their ids
    assert tok.decode(tok.encode("a<|im_end|>b"), skip_special=True) == "ab"
    assert tok.token_to_piece(im_end) == b"<|im_end|>" and tok.token_to_piece(10 ** 6) == b""
    assert im_end in tok.eog_ids and tok.eos_id == im_end


def test_runtime_accepts_str_pieces_and_numpy_model(tmp_path):
    """the C loader hands strings back as str (surrogateescape for partial UTF-8) and U8 arrays as numpy"""
    from tests.test_convert import _train_spm
    hf = make_tiny_llama(tmp_path / "hf", vocab=316)
    os.unlink(os.path.join(hf, "tokenizer.json"))
    os.unlink(os.path.join(hf, "tokenizer_config.json"))
    _train_spm(os.path.join(hf, "tokenizer.model"))
    meta = _plain(tokenizer_metadata(hf, {}))
    assert meta["tokenizer.kind"] == "spm" and meta["tokenizer.bos_id"] >= 0 and meta["tokenizer.add_bos"] is True
    meta["tokenizer.spm_model"] = np.frombuffer(meta["tokenizer.spm_model"], np.uint8)
    meta["tokenizer.token_bytes"] = [p.decode("utf-8", "surrogateescape") for p in meta["tokenizer.token_bytes"]]
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(hf, "tokenizer.model"))
    tok = Tokenizer.from_metadata(meta)
    for text in ["The quick brown fox", "東京 café 🚀", "  two  spaces"]:
        assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    # control pieces written in the text are read as their ids, as transformers does
    assert tok.encode("hi</s>", special=False) == sp.encode("hi") + [sp.eos_id()]
    assert tok.decode(tok.encode("hi"), skip_special=True) == "hi"
    assert isinstance(tok.token_to_piece(sp.piece_to_id("<0x0A>")), bytes)


def test_missing_tokenizer_is_a_clear_value_error():
    with pytest.raises(TokenizerError, match="no tokenizer; re-convert") as info:
        Tokenizer.from_metadata({"general.architecture": "llama"})
    assert isinstance(info.value, ValueError)


def test_chat_template_environment(tiny_meta):
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
                "{% generation %}[{{ m.role }}:{{ m.content }}]{% endgeneration %}\n{% endfor %}"
                "{{ ns.n }} {{ bos_token }} {{ {'a': 'é<'} | tojson }} {{ strftime_now('%Y') | length }}"
                "{% if add_generation_prompt %}>{% endif %}{{ tools is none }}{{ extra | default('') }}")
    tok = Tokenizer.from_metadata(dict(tiny_meta, **{"tokenizer.chat_template": template}))
    msgs = [{"role": "user", "content": "hi", "tool_calls": None}, {"role": "assistant", "content": "yo"}]
    # trim_blocks eats the newline after {% endgeneration %}, as in transformers
    assert tok.apply_chat_template(msgs) == '[user:hi][assistant:yo]2 <|im_start|> {"a": "é<"} 4>True'
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils.chat_template_utils import render_jinja_template
        want, _ = render_jinja_template([msgs], chat_template=template, add_generation_prompt=True,
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
        assert tok.apply_chat_template(msgs) == want[0]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False, extra="!").endswith("4True!")
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_metadata({k: v for k, v in tiny_meta.items() if k != "tokenizer.chat_template"}) \
            .apply_chat_template(msgs)


@needs_transformers
def test_policy_matches_transformers_on_config_variants(tmp_path):
    """add_bos_token / add_eos_token in tokenizer_config.json (ignored beside a tokenizer.json) and special tokens
    named only there (registered as special) behave as in transformers' AutoTokenizer"""
    from transformers import AutoTokenizer
    base = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    variants = [dict(base, add_bos_token=True), dict(base, add_bos_token=True, add_eos_token=True),
                dict(base, add_eos_token=True), dict(base, unk_token="<|endoftext|>", pad_token="<pad>"), base]
    for k, tcfg in enumerate(variants):
        hf = _hf_dir_with_tokenizer(tmp_path / str(k), tokenizer_config=tcfg)
        ref = AutoTokenizer.from_pretrained(hf)
        tok = Tokenizer.from_metadata(_plain(tokenizer_metadata(hf, {})))
        for text in ["Hello world", "x<pad>y<|im_end|>", ""]:
            assert tok.encode(text) == ref(text).input_ids, (tcfg, text)
            assert tok.encode(text, special=False) == ref(text, add_special_tokens=False).input_ids, (tcfg, text)
            ids = ref(text).input_ids
            assert tok.decode(ids) == ref.decode(ids) and tok.decode(ids, True) == ref.decode(ids, True)


# ---- against transformers on the real SmolLM2 tokenizer ----
@pytest.fixture(scope="module")
def smollm2(smollm2_hf_dir):
    from transformers import AutoTokenizer
    config = json.load(open(os.path.join(smollm2_hf_dir, "config.json")))
    return Tokenizer.from_metadata(_plain(tokenizer_metadata(smollm2_hf_dir, config))), \
        AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.mark.parametrize("name", ["wiki_text", "c4_text"])
def test_smollm2_encode_matches_transformers_on_real_text(smollm2, name, request):
    tok, ref = smollm2
    text = request.getfixturevalue(name)[:200_000]
    ids = tok.encode(text)
    assert ids == ref(text).input_ids
    assert tok.encode(text, special=False) == ref(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ref.decode(ids)
    pieces = [tok.token_to_piece(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")       # what the C detokenizer will stream


def test_smollm2_tricky_strings_match_transformers(smollm2):
    tok, ref = smollm2
    for text in TRICKY + ["<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n",
                          "<repo_name>x<file_sep>", "   \n\n   ", "💩" * 20]:
        ids = ref(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.encode(text, special=False) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids), text
        assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.n_vocab == len(ref) and tok.bos_id == ref.bos_token_id and tok.eos_id == ref.eos_token_id
    assert ref.convert_tokens_to_ids("<|im_end|>") in tok.eog_ids


def test_smollm2_token_bytes_reproduce_single_token_decode(smollm2):
    tok, ref = smollm2
    for i in range(tok.n_vocab):
        text = ref.decode([i])
        if "\ufffd" not in text:
            assert tok.token_to_piece(i) == text.encode("utf-8"), i


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smollm2, generation_prompt):
    tok, ref = smollm2
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 👋"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "東京は?\n  spaced  "}],
    ]
    for messages in conversations:
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert tok.apply_chat_template(messages, add_generation_prompt=generation_prompt) == want
        assert tok.encode(want, special=False) == ref(want, add_special_tokens=False).input_ids


def test_smollm2_metadata_is_complete(smollm2_hf_dir, tmp_path):
    """everything the runtime needs survives in the directory's metadata, even with the directory gone"""
    copy = tmp_path / "copy"
    shutil.copytree(smollm2_hf_dir, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    meta = _plain(tokenizer_metadata(str(copy), json.load(open(copy / "config.json"))))
    shutil.rmtree(copy)
    assert {"tokenizer.kind", "tokenizer.hf_json", "tokenizer.token_bytes", "tokenizer.token_type",
            "tokenizer.bos_id", "tokenizer.eos_id", "tokenizer.pad_id", "tokenizer.eog_ids", "tokenizer.add_bos",
            "tokenizer.add_eos", "tokenizer.chat_template"} <= set(meta)
    assert Tokenizer.from_metadata(meta).encode("Hello") == Tokenizer.from_metadata(meta).encode("Hello", False)
