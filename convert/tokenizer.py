"""The tokenizer.* metadata of a .qrz (docs/FORMAT.md), read from a Hugging Face model directory.

The whole tokenizer.json (or tokenizer.model) goes into the file, so the runtime tokenizes through the same
library transformers uses and gets identical ids. Beside it: a table of the bytes each id decodes to, for the C
detokenizer that streams generated text, plus special ids, end-of-generation ids and the chat template.
"""
import json
import os

from .errors import ConvertError
from .qrzfile import ARRAY, I32, KV

# end-of-turn markers of common chat formats: generation stops at any of them when present in the vocabulary
END_OF_TURN_TOKENS = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "<eos>", "</s>",
                      "<|end_of_text|>", "<|eom_id|>"]

NORMAL, CONTROL, BYTE, USER_DEFINED, UNKNOWN = range(5)


def gpt2_unicode_to_byte():
    """Inverse of byte-level BPE's byte -> printable character map: printable Latin-1 bytes map to themselves,
    the other 68 bytes to code points from 256 upward, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"'{path}' is not valid JSON ({exc})")
    return data if isinstance(data, dict) else {}


def _token_content(value):
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value):
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _is_byte_level(tj):
    def has(node):
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))
    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _spm_piece_bytes(piece):
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)]), BYTE
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode("utf-8"), NORMAL


def _from_tokenizer_json(text):
    tj = json.loads(text)
    model = tj.get("model", {})
    byte_level = _is_byte_level(tj)
    pieces = {}
    if model.get("type") == "Unigram":
        for i, entry in enumerate(model.get("vocab", [])):
            pieces[i] = entry[0]
    else:
        pieces = {int(i): tok for tok, i in model.get("vocab", {}).items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    n = max(list(pieces) + list(added)) + 1 if (pieces or added) else 0
    to_byte = gpt2_unicode_to_byte()
    token_bytes, token_type = [b""] * n, [UNKNOWN] * n
    for i, piece in pieces.items():
        if byte_level:
            mapped = all(ch in to_byte for ch in piece)
            token_bytes[i] = bytes(to_byte[ch] for ch in piece) if mapped else piece.encode("utf-8")
            token_type[i] = NORMAL
        else:
            token_bytes[i], token_type[i] = _spm_piece_bytes(piece)
    unk = model.get("unk_token")
    for i, a in added.items():
        token_bytes[i] = a["content"].encode("utf-8")
        token_type[i] = CONTROL if a.get("special") else USER_DEFINED
    vocab = {piece: i for i, piece in pieces.items()}
    vocab.update({a["content"]: i for i, a in added.items()})
    if unk in vocab:
        token_type[vocab[unk]] = CONTROL if added.get(vocab[unk], {}).get("special") else UNKNOWN
    return ("bpe" if byte_level and model.get("type") == "BPE" else "spm"), vocab, token_bytes, token_type


def _from_spm_model(raw):
    try:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_proto=raw)
    except Exception as exc:
        raise ConvertError(f"tokenizer.model could not be read by sentencepiece ({exc})")
    n = sp.get_piece_size()
    vocab, token_bytes, token_type = {}, [], []
    for i in range(n):
        piece = sp.id_to_piece(i)
        vocab[piece] = i
        if sp.is_control(i):
            token_bytes.append(piece.encode("utf-8"))
            token_type.append(CONTROL)
        elif sp.is_unknown(i):
            token_bytes.append(piece.encode("utf-8"))
            token_type.append(UNKNOWN)
        elif sp.is_byte(i):
            token_bytes.append(_spm_piece_bytes(piece)[0])
            token_type.append(BYTE)
        else:
            token_bytes.append(piece.replace("\u2581", " ").encode("utf-8"))
            token_type.append(NORMAL)
    return vocab, token_bytes, token_type, (sp.bos_id(), sp.eos_id(), sp.pad_id())


def _chat_template(model_dir, tcfg):
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tcfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# tokenizer classes whose transformers 5 constructor sets a normalizer whatever tokenizer.json says
CLASS_NORMALIZERS = {"Qwen2Tokenizer": "NFC"}


def _effective_tokenizer_json(text, tcfg):
    """tokenizer.json as transformers runs it: every special token named in tokenizer_config.json is registered
    as a special added token (so its text in a prompt becomes its id), and a tokenizer class that brings its own
    normalizer gets it (Qwen2Tokenizer: NFC, also over a tokenizer.json saved without one, as transformers writes
    for a GGUF). add_bos_token / add_eos_token are not applied: transformers drops them when tokenizer.json exists
    and lets its post-processor decide."""
    tj = json.loads(text)
    present = {a.get("content") for a in tj.get("added_tokens", [])}
    named = [_token_content(tcfg.get(k)) for k in SPECIAL_TOKEN_KEYS]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = tcfg.get(key)
        named += [_token_content(v) for v in (extra.values() if isinstance(extra, dict) else extra or [])]
    missing = list(dict.fromkeys(c for c in named if c and c not in present))
    normalizer = CLASS_NORMALIZERS.get(tcfg.get("tokenizer_class")) if tj.get("normalizer") is None else None
    if not missing and not normalizer:
        return text
    from tokenizers import AddedToken, Tokenizer, normalizers
    tok = Tokenizer.from_str(text)
    if normalizer:
        tok.normalizer = getattr(normalizers, normalizer)()
    if missing:
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in missing])
    return tok.to_str()


def _hf_special_policy(text, bos, eos):
    """(add_bos, add_eos) as the tokenizer.json post-processor applies them."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(text)
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    if len(full) <= len(plain):
        return False, False
    return bos >= 0 and full[0] == bos, eos >= 0 and full[-1] == eos


def tokenizer_metadata(model_dir, config):
    """The tokenizer.* keys for a Hugging Face model directory (tokenizer.json and/or tokenizer.model, with
    tokenizer_config.json, generation_config.json and chat_template.jinja beside them)."""
    tj_path = os.path.join(model_dir, "tokenizer.json")
    sp_path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.isfile(tj_path) and not os.path.isfile(sp_path):
        raise ConvertError(f"no tokenizer in '{model_dir}': it needs tokenizer.json or tokenizer.model "
                           f"(save the tokenizer with tokenizer.save_pretrained into the same directory)")
    tcfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    gen = _read_json(os.path.join(model_dir, "generation_config.json"))
    tokenizer_json = spm_model = None
    if os.path.isfile(tj_path):
        try:
            with open(tj_path, encoding="utf-8") as f:
                tokenizer_json = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"'{tj_path}' is not a readable tokenizer.json ({exc}); restore it from the model's "
                               f"source") from None
    if os.path.isfile(sp_path):
        try:
            with open(sp_path, "rb") as f:
                spm_model = f.read()
        except OSError as exc:
            raise ConvertError(f"cannot read '{sp_path}': {exc}") from None
    return build_tokenizer_metadata(config, tcfg, gen, tokenizer_json=tokenizer_json, spm_model=spm_model,
                                    chat_template=_chat_template(model_dir, tcfg), origin=tj_path)


def build_tokenizer_metadata(config, tcfg, gen, tokenizer_json=None, spm_model=None, chat_template=None,
                             token_type=None, origin="tokenizer.json"):
    """The tokenizer.* keys from a tokenizer already in memory: the text of a tokenizer.json and/or the bytes of a
    tokenizer.model, with what tokenizer_config.json (`tcfg`), generation_config.json (`gen`) and config.json
    (`config`) say about special tokens. A Hugging Face directory and a GGUF file both end up here.

    token_type: per-id types (docs/FORMAT.md) to use instead of the ones sentencepiece reports, for a source that
    records its own (GGUF); only used when there is no tokenizer.json. origin names the tokenizer.json in errors."""
    if tokenizer_json is None and spm_model is None:
        raise ConvertError("no tokenizer: need a tokenizer.json or a tokenizer.model")
    meta = {}
    spm_ids = (-1, -1, -1)   # sentencepiece's own bos/eos/pad, the fallback when no config names them
    clean_up = bool(tcfg.get("clean_up_tokenization_spaces", False))
    if tokenizer_json is not None:
        try:
            text = _effective_tokenizer_json(tokenizer_json, tcfg)
            kind, vocab, token_bytes, types = _from_tokenizer_json(text)
        except Exception as exc:   # tokenizers reports a malformed file as a plain Exception
            raise ConvertError(f"'{origin}' is not a readable tokenizer.json ({exc}); restore it from the model's "
                               f"source") from None
        meta["tokenizer.kind"] = kind
        meta["tokenizer.hf_json"] = text
        # transformers skips the clean-up for BPE models: it would strip real spaces before punctuation
        clean_up = clean_up and json.loads(text).get("model", {}).get("type") != "BPE"
    if spm_model is not None:
        if "tokenizer.kind" not in meta:
            vocab, token_bytes, types, spm_ids = _from_spm_model(spm_model)
            if token_type is not None:
                if len(token_type) != len(types):
                    raise ConvertError(f"{len(token_type)} token types for a vocabulary of {len(types)} pieces")
                types = list(token_type)
            meta["tokenizer.kind"] = "spm"
        meta["tokenizer.spm_model"] = spm_model

    def token_id(value):
        content = _token_content(value)
        return vocab.get(content, -1) if content is not None else -1

    def first_id(*candidates):
        return next((i for i in candidates if isinstance(i, int) and not isinstance(i, bool) and i >= 0), -1)

    eos_ids = _ids(config.get("eos_token_id")) + _ids(gen.get("eos_token_id"))
    bos = first_id(token_id(tcfg.get("bos_token")), config.get("bos_token_id"), gen.get("bos_token_id"), spm_ids[0])
    eos = first_id(token_id(tcfg.get("eos_token")), *eos_ids, spm_ids[1])
    pad = first_id(token_id(tcfg.get("pad_token")), config.get("pad_token_id"), gen.get("pad_token_id"), spm_ids[2])
    eog = []
    # an end-of-turn marker only counts as one when it is a special token: "</s>" is plain text (an HTML tag) in
    # Gemma's and Qwen's vocabularies, and stopping there would cut off generated HTML
    turn_ids = [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    for i in [eos] + eos_ids + [i for i in turn_ids if i < len(types) and types[i] == CONTROL]:
        if 0 <= i < len(token_bytes) and i not in eog:
            eog.append(i)
    meta.update({
        "tokenizer.token_bytes": token_bytes,
        "tokenizer.token_type": KV(ARRAY, types, I32),
        "tokenizer.bos_id": KV(I32, bos),
        "tokenizer.eos_id": KV(I32, eos),
        "tokenizer.pad_id": KV(I32, pad),
        "tokenizer.eog_ids": KV(ARRAY, eog, I32),
        "tokenizer.clean_up_spaces": clean_up,
    })
    if "tokenizer.hf_json" in meta:   # the post-processor applies the policy; the flags record what it does
        meta["tokenizer.add_bos"], meta["tokenizer.add_eos"] = _hf_special_policy(meta["tokenizer.hf_json"], bos, eos)
    else:   # without tokenizer.json these flags are the whole policy (LlamaTokenizer's defaults)
        meta["tokenizer.add_bos"] = bool(tcfg.get("add_bos_token", True)) and bos >= 0
        meta["tokenizer.add_eos"] = bool(tcfg.get("add_eos_token", False)) and eos >= 0
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta
