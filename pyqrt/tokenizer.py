"""Tokenizing with the tokenizer stored in the .qrz, through the same libraries transformers uses
(`tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model), so ids match Hugging Face exactly.
Chat templates are Jinja, rendered with jinja2 the way transformers renders them."""
import datetime
import json

from .errors import TokenizerError


def _clean_up_spaces(text):
    # transformers' clean_up_tokenization, applied when the tokenizer config asks for it
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    def __init__(self, meta):
        self.kind = meta.get("tokenizer.kind")
        self.bos_id = meta.get("tokenizer.bos_id", -1)
        self.eos_id = meta.get("tokenizer.eos_id", -1)
        self.eog_ids = list(meta.get("tokenizer.eog_ids", []))
        self.add_bos = bool(meta.get("tokenizer.add_bos", False))
        self.add_eos = bool(meta.get("tokenizer.add_eos", False))
        self.clean_up_spaces = bool(meta.get("tokenizer.clean_up_spaces", False))
        self.chat_template = meta.get("tokenizer.chat_template")
        self._pieces = meta.get("tokenizer.token_bytes", [])
        self._hf = self._sp = None
        if meta.get("tokenizer.hf_json"):
            from tokenizers import Tokenizer as HFTokenizer
            self._hf = HFTokenizer.from_str(meta["tokenizer.hf_json"])
        elif meta.get("tokenizer.spm_model"):
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=bytes(meta["tokenizer.spm_model"]))
        else:
            raise TokenizerError("this .qrz has no tokenizer; convert the model again from a directory with "
                                 "tokenizer.json or tokenizer.model")
        self._template = None

    @classmethod
    def from_metadata(cls, meta):
        return cls(meta)

    @property
    def n_vocab(self):
        return len(self._pieces)

    def _piece(self, i):
        return self._pieces[i].encode("utf-8", "surrogateescape").decode("utf-8", "replace") \
            if 0 <= i < len(self._pieces) else ""

    @property
    def bos_token(self):
        return self._piece(self.bos_id)

    @property
    def eos_token(self):
        return self._piece(self.eos_id)

    def encode(self, text, special=True):
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=special).ids
        ids = self._sp.encode(text)
        if special and self.add_bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if special and self.add_eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special=False):
        if self._hf is not None:
            text = self._hf.decode(list(ids), skip_special_tokens=skip_special)
        else:
            text = self._sp.decode(list(ids))
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        if not self.chat_template:
            raise TokenizerError("this model has no chat template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


def _compile_template(source):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # the same environment settings transformers uses, so templates render byte-for-byte alike
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)
