"""Tokenizing with the tokenizer stored in the .qrz, through the same libraries transformers uses
(`tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model), so ids match Hugging Face exactly.
Chat templates are Jinja, rendered with jinja2 in the environment transformers sets up. Never imports torch or
transformers."""
import datetime
import json
import re

from .errors import TokenizerError

CONTROL = 1   # token_type of special tokens (docs/FORMAT.md)


def _clean_up_spaces(text):
    # transformers' clean_up_tokenization, applied when the tokenizer config asks for it
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _as_bytes(piece):
    # metadata readers hand strings back as str (surrogateescape for partial UTF-8) or as bytes
    return piece if isinstance(piece, (bytes, bytearray)) else piece.encode("utf-8", "surrogateescape")


class Tokenizer:
    """Built from a .qrz's metadata dict (key -> str, bytes, list, int, bool): `Tokenizer.from_metadata(meta)`."""

    def __init__(self, meta):
        self.kind = meta.get("tokenizer.kind")
        self.bos_id = int(meta.get("tokenizer.bos_id", -1))
        self.eos_id = int(meta.get("tokenizer.eos_id", -1))
        self.pad_id = int(meta.get("tokenizer.pad_id", -1))
        self.eog_ids = [int(i) for i in meta.get("tokenizer.eog_ids", [])]
        self.add_bos = bool(meta.get("tokenizer.add_bos", False))
        self.add_eos = bool(meta.get("tokenizer.add_eos", False))
        self.clean_up_spaces = bool(meta.get("tokenizer.clean_up_spaces", False))
        self.chat_template = meta.get("tokenizer.chat_template")
        self._pieces = [_as_bytes(p) for p in meta.get("tokenizer.token_bytes", [])]
        self._types = list(meta.get("tokenizer.token_type", []))
        self._hf = self._sp = self._special_re = None
        if meta.get("tokenizer.hf_json"):
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_str(meta["tokenizer.hf_json"])
        elif meta.get("tokenizer.spm_model") is not None and len(meta["tokenizer.spm_model"]):
            import sentencepiece
            raw = meta["tokenizer.spm_model"]
            raw = raw.tobytes() if hasattr(raw, "tobytes") else bytes(raw)
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=raw)
            self._special = {}
            for i, t in enumerate(self._types):
                # control pieces (<s>, </s>, ...) written in the text are read as their ids, as transformers does;
                # sentencepiece itself would spell them out
                if t == CONTROL and i < len(self._pieces) and len(self._pieces[i]) > 1:
                    self._special.setdefault(self._pieces[i].decode("utf-8", "replace"), i)
            if self._special:
                alternatives = sorted(self._special, key=len, reverse=True)
                self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        else:
            raise TokenizerError("this .qrz has no tokenizer; re-convert from a directory with tokenizer.json or "
                                 "tokenizer.model")
        self._template = None

    @classmethod
    def from_metadata(cls, meta):
        return cls(meta)

    @property
    def n_vocab(self):
        if self._pieces:
            return len(self._pieces)
        return self._hf.get_vocab_size() if self._hf is not None else self._sp.get_piece_size()

    def token_to_piece(self, token_id):
        """The bytes token `token_id` stands for (what the C detokenizer emits for it)."""
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""

    def _token_text(self, token_id):
        return self.token_to_piece(token_id).decode("utf-8", "replace") if token_id >= 0 else None

    @property
    def bos_token(self):
        return self._token_text(self.bos_id)

    @property
    def eos_token(self):
        return self._token_text(self.eos_id)

    def encode(self, text, special=True):
        """Text to ids. special=True adds BOS/EOS as the model's tokenizer does (transformers'
        add_special_tokens=True); special-token strings in the text always become their ids."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=special).ids
        chunks = self._special_re.split(text) if self._special_re is not None else [text]
        ids = []
        for k, chunk in enumerate(chunks):
            if k % 2:
                ids.append(self._special[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        if special and self.add_bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if special and self.add_eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special=False):
        """Ids to text, as transformers' tokenizer.decode(ids, skip_special_tokens=skip_special)."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            text = self._hf.decode(ids, skip_special_tokens=skip_special)
        else:
            text = self._decode_spm(ids, skip_special)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def _decode_spm(self, ids, skip_special):
        # sentencepiece renders control pieces (<bos>, <end_of_turn>) as nothing; transformers spells them out
        # unless asked to skip them, so they are cut out here and the text runs between them decoded alone
        parts, run = [], []
        for i in ids:
            if 0 <= i < len(self._types) and self._types[i] == CONTROL:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                if not skip_special:
                    parts.append(self.token_to_piece(i).decode("utf-8", "replace"))
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, documents=None, **kwargs):
        """The conversation rendered with the model's own Jinja template, as transformers'
        apply_chat_template(messages, tokenize=False, ...) renders it."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self._token_text(self.pad_id)}
        context = {k: v for k, v in special.items() if v is not None}
        context.update(kwargs)
        return self._template.render(messages=_normalize_messages(messages), tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **context)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize_messages(messages):
    # what transformers does before rendering: drop None-valued keys (APIs send content=None), and offer a
    # message's reasoning under every name templates read it by
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _compile_template(source):
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks assistant text for training masks; rendering ignores it
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # no underscore attributes, so a template cannot reach interpreter internals through a namespace
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # the environment transformers renders in, so templates come out byte-for-byte alike
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    env.globals["namespace"] = Namespace
    return env.from_string(source)
