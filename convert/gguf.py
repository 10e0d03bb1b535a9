"""A llama.cpp GGUF file, seen as what the converter reads from a Hugging Face directory.

    m = GGUFModel("model.gguf")
    m.config                  # config.json as transformers would write it for this model
    m.source                  # tensors under their Hugging Face names and shapes, dequantized to float32 on load
    m.tokenizer_metadata()    # the tokenizer.* keys, as convert.tokenizer makes them for a directory
    m.close()

What llama.cpp's converter changed is undone here, so both routes give the same .qrz:
- names: blk.N.attn_q.weight -> model.layers.N.self_attn.q_proj.weight, ... (_TENSOR_NAMES);
- shapes: GGUF lists dimensions innermost first; numpy and Hugging Face outermost first;
- llama: q/k rows are reordered so RoPE rotates adjacent pairs; put back in rotate-half order (_unpermute_rope);
- gemma3: RMSNorm weights are stored as 1 + w; Hugging Face stores w;
- tokenizer: rebuilt from tokenizer.ggml.* as a tokenizer.json (byte-level BPE) or a SentencePiece model.

The file is read with the `gguf` package (its GGUFReader memory-maps the file); each tensor is dequantized by
gguf.quants.dequantize only when asked for, so memory holds about one tensor at a time. Opening parses every
metadata value, which for a 262k-token vocabulary takes GGUFReader a good ten seconds.
"""
import math
import os
import struct

import numpy as np

from .errors import ConvertError
from .tokenizer import (BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, build_tokenizer_metadata,
                        gpt2_unicode_to_byte)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# llama.cpp tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TENSOR_NAMES = {   # per architecture: the layer names beyond the common ones, and which suffixes exist
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"},
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# what the GGUF cannot say about each architecture: transformers' values for these models
_HF_CLASS = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
             "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}
GEMMA3_SLIDING_PERIOD = 6        # llama.cpp's gemma3: every 6th layer attends globally, the others in a window
GEMMA3_LOCAL_ROPE_THETA = 10000.0
LLAMA3_ORIGINAL_CONTEXT = 8192   # what llama.cpp assumes when it bakes llama3 RoPE scaling into rope_freqs

# ---- tokenizer: pre-tokenizer split regexes by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp) ----
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (regexes applied in turn, each isolating its matches; whether a word found whole in the vocabulary skips
# the merges, as llama.cpp and Llama-3's tokenizer.json do)
PRE_TOKENIZERS = {
    **{name: ([_GPT2_SPLIT], False) for name in ("gpt2", "mpt", "olmo", "jais")},
    # digits one by one, then GPT-2's split
    **{name: ([r"\p{N}", _GPT2_SPLIT], False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell")},
    **{name: ([_QWEN2_SPLIT], False) for name in ("qwen2", "stablelm2", "deepseek-r1-qwen")},
    **{name: ([_LLAMA3_SPLIT], True) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")},
}
_BOS_BY_DEFAULT = ("llama-bpe", "llama3", "llama-v3", "falcon3")   # llama.cpp adds BOS for these unless told not to
# Unicode normalization the model's own tokenizer applies first (Qwen2's tokenizer.json and transformers'
# Qwen2Tokenizer compose to NFC; llama.cpp skips it, which only matters for decomposed input)
_NORMALIZERS = {"qwen2": "NFC"}

# llama.cpp token types (the same numbers as SentencePiece's piece types)
GG_NORMAL, GG_UNKNOWN, GG_CONTROL, GG_USER_DEFINED, GG_UNUSED, GG_BYTE = 1, 2, 3, 4, 5, 6
_FORMAT_TYPE = {GG_NORMAL: NORMAL, GG_UNKNOWN: UNKNOWN, GG_CONTROL: CONTROL, GG_USER_DEFINED: USER_DEFINED,
                GG_UNUSED: NORMAL, GG_BYTE: BYTE}


def _unpermute_rope(w, n_heads):
    """Undo llama.cpp's q/k permutation. Per head of d rows, Hugging Face keeps the two rotated halves apart
    (rows j and d/2 + j form pair j); llama.cpp stores each pair on adjacent rows (2j, 2j + 1). Works for a
    weight (rows, cols) and a bias (rows,)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _minus_one(w):
    return w - np.float32(1.0)


class _Entry:
    """where a Hugging Face tensor comes from: the GGUF tensor, what undoes llama.cpp's change to it, the file"""
    __slots__ = ("tensor", "transform", "path")

    def __init__(self, tensor, transform, path):
        self.tensor, self.transform, self.path = tensor, transform, path


class GGUFTensorSource:
    """The TensorSource interface of convert/hf.py over a GGUF: Hugging Face names and (rows, cols) shapes,
    float32 values dequantized on load."""

    def __init__(self, reader, plan):
        self._reader = reader
        self.where = plan   # hf name -> _Entry

    def names(self):
        return list(self.where)

    def shape(self, name):
        return tuple(int(d) for d in reversed(self.where[name].tensor.shape.tolist()))

    def dtype(self, name):
        return "F32"

    def gguf_type(self, name):
        """the GGUF storage type of a tensor, e.g. "Q4_K" (for messages and tests)"""
        return self.where[name].tensor.tensor_type.name

    def load(self, name):
        if name not in self.where:
            raise ConvertError(f"tensor '{name}' is missing from the GGUF file")
        if self._reader is None:
            raise ConvertError("the GGUF file is closed")
        from gguf.quants import dequantize
        tensor, transform = self.where[name].tensor, self.where[name].transform
        try:
            w = dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, TypeError) as exc:
            raise ConvertError(f"tensor '{tensor.name}' ({tensor.tensor_type.name}) could not be dequantized: {exc}")
        w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
        if transform is not None:
            w = transform(w)
        return np.require(w, np.float32, ["C", "W", "O"])   # owns its memory (copied only if a view of the map)

    def close(self):
        self._reader = None


class GGUFModel:
    """A GGUF file as config + tensors + tokenizer. Raises ConvertError for anything it cannot convert."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._reader = _open_reader(self.path)
        try:
            self._fields = self._reader.fields
            self.arch = self._string("general.architecture")
            if self.arch not in SUPPORTED_ARCHITECTURES:
                raise ConvertError(f"'{self.path}' holds a model of architecture '{self.arch}', which is not "
                                   f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
            self._tensors = {t.name: t for t in self._reader.tensors}
            self._check_tokenizer()
            self.config = self._config()
            self.source = GGUFTensorSource(self._reader, self._plan())
        except BaseException:
            self._reader = None
            raise

    # ---- metadata ----
    def _has(self, key):
        return key in self._fields

    def _get(self, key, default=None):
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise ConvertError(f"metadata '{key}' in '{self.path}' holds text that is not UTF-8: the file is corrupt")

    def _string(self, key):
        value = self._get(key)
        if not isinstance(value, str):
            raise ConvertError(f"'{self.path}' lacks the metadata string '{key}'; is it a llama.cpp model file?")
        return value

    def _count(self, key, default=None):
        """a positive integer hyper-parameter; llama.cpp may store one value per layer, which must then agree"""
        value = self._get(f"{self.arch}.{key}", default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        if isinstance(value, list):
            raise ConvertError(f"'{self.arch}.{key}' differs between layers ({value[:8]}...); models whose layers "
                               f"differ in shape are not supported")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConvertError(f"'{self.path}' lacks a positive integer '{self.arch}.{key}' (found {value!r})")
        return value

    def _token_id(self, name):
        value = self._get(f"tokenizer.ggml.{name}_token_id")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    # ---- config.json ----
    def _config(self):
        arch = self.arch
        n_embd, n_layers = self._count("embedding_length"), self._count("block_count")
        n_heads = self._count("attention.head_count")
        n_kv = self._count("attention.head_count_kv", n_heads)
        head_dim = self._count("attention.key_length", n_embd // n_heads)
        if self._has(f"{arch}.attention.value_length") and self._count("attention.value_length") != head_dim:
            raise ConvertError(f"key and value head sizes differ ({head_dim} and "
                               f"{self._count('attention.value_length')}); not supported")
        if self._has(f"{arch}.rope.dimension_count") and self._count("rope.dimension_count") != head_dim:
            raise ConvertError(f"RoPE rotates {self._count('rope.dimension_count')} of {head_dim} dimensions per head; "
                               f"partial rotary embeddings are not supported")
        if "token_embd.weight" not in self._tensors:
            raise ConvertError(f"'{self.path}' has no token_embd.weight tensor")
        vocab = int(self._tensors["token_embd.weight"].shape[-1])
        eps = self._get(f"{arch}.attention.layer_norm_rms_epsilon")
        if not isinstance(eps, float):
            raise ConvertError(f"'{self.path}' lacks '{arch}.attention.layer_norm_rms_epsilon'; only RMSNorm models "
                               f"are supported")
        hf_class, model_type = _HF_CLASS[arch]
        config = {
            "architectures": [hf_class],
            "model_type": model_type,
            "_model_name_or_path": self._get("general.name") or os.path.basename(self.path),
            "hidden_size": n_embd,
            "intermediate_size": self._count("feed_forward_length"),
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": self._count("context_length"),
            "rms_norm_eps": eps,
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_dropout": 0.0,
        }
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id"),
                          ("unknown", "unk_token_id")):
            if self._token_id(name) is not None:
                config[key] = self._token_id(name)
        rope = self._rope_parameters(head_dim)
        if arch == "gemma3":
            config.update(self._gemma3_config(n_embd, n_heads, n_layers, head_dim, rope))
        else:
            config["rope_parameters"] = rope
            config["hidden_act"] = "silu"
            if arch == "llama":
                config.update({"attention_bias": "blk.0.attn_q.bias" in self._tensors,
                               "mlp_bias": "blk.0.ffn_up.bias" in self._tensors, "pretraining_tp": 1})
            else:   # qwen2: q/k/v always carry a bias; no sliding window in llama.cpp's qwen2
                config.update({"use_sliding_window": False, "sliding_window": None,
                               "layer_types": ["full_attention"] * n_layers})
        return config

    def _gemma3_config(self, n_embd, n_heads, n_layers, head_dim, rope):
        pattern = self._get("gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list) and len(pattern) == n_layers:   # newer files: per layer, true = windowed
            sliding = [bool(p) for p in pattern]
        else:
            period = pattern if isinstance(pattern, int) and pattern > 0 else GEMMA3_SLIDING_PERIOD
            sliding = [(i + 1) % period != 0 for i in range(n_layers)]
        window = self._get("gemma3.attention.sliding_window")
        if not isinstance(window, int) or window <= 0:
            raise ConvertError(f"'{self.path}' lacks 'gemma3.attention.sliding_window'")
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B model where it is
        # 1/sqrt(hidden/heads); Gemma 3's configs say the same through query_pre_attn_scalar
        scalar = n_embd // n_heads if n_layers == 62 else head_dim
        local = {"rope_theta": GEMMA3_LOCAL_ROPE_THETA, "rope_type": "default"}
        config = {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": scalar,
            "sliding_window": window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {"full_attention": rope, "sliding_attention": local},
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "use_bidirectional_attention": False,
        }
        if not isinstance(pattern, list):
            config["_sliding_window_pattern"] = period
        return config

    def _rope_parameters(self, head_dim):
        arch = self.arch
        theta = self._get(f"{arch}.rope.freq_base", 10000.0)
        if not isinstance(theta, (int, float)) or theta <= 0:
            raise ConvertError(f"'{arch}.rope.freq_base' is {theta!r}; expected a positive number")
        theta = float(theta)
        kind = self._get(f"{arch}.rope.scaling.type", "none")
        factor = self._get(f"{arch}.rope.scaling.factor")
        if "rope_freqs.weight" in self._tensors:
            if kind not in ("none", None) or arch != "llama":
                raise ConvertError(f"'{self.path}' has a rope_freqs tensor besides rope scaling '{kind}' "
                                   f"({arch}); this combination is not supported")
            return self._llama3_rope(theta, head_dim)
        if kind in ("none", None) or (kind == "linear" and factor in (None, 1.0)):
            return {"rope_theta": theta, "rope_type": "default"}
        if kind == "linear":
            return {"rope_theta": theta, "rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            params = {"rope_theta": theta, "rope_type": "yarn", "factor": float(factor)}
            original = self._get(f"{arch}.rope.scaling.original_context_length")
            if isinstance(original, int):
                params["original_max_position_embeddings"] = original
            for key, hf_key in (("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                ("yarn_beta_slow", "beta_slow")):
                value = self._get(f"{arch}.rope.scaling.{key}")
                if isinstance(value, float):
                    params[hf_key] = value
            return params
        raise ConvertError(f"RoPE scaling '{kind}' in '{self.path}' is not supported; supported: none, linear, yarn")

    def _llama3_rope(self, theta, head_dim):
        """Llama 3.1+ RoPE scaling, which llama.cpp stores only as per-frequency factors (the rope_freqs tensor).
        Recovered as the llama3 rope_parameters that reproduce those factors, checked against every one of them."""
        from gguf.quants import dequantize
        t = self._tensors["rope_freqs.weight"]
        factors = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        if factors.size != head_dim // 2 or not np.all(np.isfinite(factors)) or factors.min() <= 0:
            raise ConvertError(f"rope_freqs in '{self.path}' has {factors.size} entries (head_dim {head_dim}) or "
                               f"non-positive values; it is not supported")
        factor = float(factors.max())
        if factor <= 1.0 + 1e-6:
            return {"rope_theta": theta, "rope_type": "default"}
        wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        candidates = [(1.0, 4.0)]   # Llama 3.1 / 3.2's low_freq_factor, high_freq_factor
        medium = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
        if medium.sum() >= 2:   # the smooth part is linear in 1/wavelength: fit its two ends
            smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
            slope, offset = np.polyfit(LLAMA3_ORIGINAL_CONTEXT / wavelen[medium], smooth, 1)
            low = -offset / slope
            candidates.append((low, low + 1 / slope))
        for low, high in candidates:
            if 0 < low < high and np.allclose(_llama3_factors(wavelen, factor, low, high), factors, rtol=1e-4):
                return {"rope_theta": theta, "rope_type": "llama3", "factor": factor,
                        "low_freq_factor": float(round(low, 6)), "high_freq_factor": float(round(high, 6)),
                        "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT}
        raise ConvertError(f"'{self.path}' scales RoPE through a rope_freqs tensor that matches no llama3 RoPE "
                           f"scaling; this RoPE scaling is not supported")

    # ---- tensors ----
    def _plan(self):
        arch, config = self.arch, self.config
        names = dict(_LAYER_NAMES, **_TENSOR_NAMES[arch])
        n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
        plan = {}
        for gg_name, tensor in self._tensors.items():
            if gg_name == "rope_freqs.weight":   # became rope_parameters
                continue
            stem, _, suffix = gg_name.rpartition(".")
            hf = None
            if stem in _GLOBAL_NAMES:
                hf = _GLOBAL_NAMES[stem]
            elif stem.startswith("blk."):
                _, layer, part = stem.split(".", 2)
                if layer.isdigit() and int(layer) < config["num_hidden_layers"] and part in names:
                    hf = f"model.layers.{int(layer)}.{names[part]}"
            if hf is None or suffix not in ("weight", "bias"):
                raise ConvertError(f"tensor '{gg_name}' in '{self.path}' has no Hugging Face counterpart in a "
                                   f"{arch} model; this variant is not supported")
            transform = None
            if arch == "llama" and stem.endswith((".attn_q", ".attn_k")):
                heads = n_heads if stem.endswith(".attn_q") else n_kv
                rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
                if rows % (2 * heads):
                    raise ConvertError(f"tensor '{gg_name}' has {rows} rows, not a multiple of 2 x {heads} heads")
                transform = (lambda h: lambda w: _unpermute_rope(w, h))(heads)
            elif arch == "gemma3" and gg_name.endswith("norm.weight"):
                transform = _minus_one
            plan[f"{hf}.{suffix}"] = _Entry(tensor, transform, self.path)
        self._check_types(plan)
        self._check_complete(plan)
        return plan

    def _check_types(self, plan):
        from gguf import GGML_QUANT_SIZES
        from gguf.quants import dequantize
        seen = {}
        for entry in plan.values():
            tensor = entry.tensor
            qtype = tensor.tensor_type
            if qtype not in seen:
                block, size = GGML_QUANT_SIZES[qtype]
                try:   # one zero block through the dequantizer says whether the gguf package knows the type
                    seen[qtype] = qtype.name in ("F32", "F16") or dequantize(np.zeros((1, size), np.uint8), qtype) \
                        is not None
                except Exception:
                    seen[qtype] = False
            if not seen[qtype]:
                raise ConvertError(f"tensor '{tensor.name}' is stored as {qtype.name}, which the gguf package cannot "
                                   f"dequantize; re-quantize the model to another type (e.g. Q8_0, Q4_K, F16)")

    def _check_complete(self, plan):
        need = ["model.embed_tokens.weight", "model.norm.weight"]
        layer_parts = list(dict(_LAYER_NAMES, **_TENSOR_NAMES[self.arch]).values())
        for i in range(self.config["num_hidden_layers"]):
            need += [f"model.layers.{i}.{p}.weight" for p in layer_parts]
            if self.arch == "qwen2":
                need += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
        for name in need:
            if name not in plan:
                raise ConvertError(f"'{self.path}' lacks the tensor for '{name}'; the file is incomplete or not a "
                                   f"{self.arch} model")

    # ---- tokenizer ----
    def _check_tokenizer(self):
        model = self._get("tokenizer.ggml.model")
        if model is None or not self._has("tokenizer.ggml.tokens"):
            raise ConvertError(f"'{self.path}' has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens); "
                               f"convert a GGUF that includes its vocabulary")
        if model not in ("gpt2", "llama"):
            raise ConvertError(f"tokenizer '{model}' in '{self.path}' is not supported; supported: gpt2 (byte-level "
                               f"BPE), llama (SentencePiece)")
        if model == "gpt2":
            # "default" (or no key) is llama.cpp's guess when its converter did not recognise the tokenizer
            pre = self._get("tokenizer.ggml.pre", "default")
            if pre not in PRE_TOKENIZERS:
                raise ConvertError(f"pre-tokenizer '{pre}' (tokenizer.ggml.pre) in '{self.path}' is not supported; "
                                   f"supported: {', '.join(sorted(PRE_TOKENIZERS))}. A file from a recent llama.cpp "
                                   f"names its pre-tokenizer")

    def tokenizer_metadata(self):
        """the tokenizer.* keys (docs/FORMAT.md), built as convert.tokenizer builds them for a directory"""
        tokens = self._get("tokenizer.ggml.tokens")
        types = self._get("tokenizer.ggml.token_type") or [GG_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ConvertError(f"'{self.path}' has {len(tokens)} tokens but {len(types)} token types")
        ids = {name: self._token_id(name) for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        add_bos = self._get("tokenizer.ggml.add_bos_token")
        add_eos = self._get("tokenizer.ggml.add_eos_token")
        config = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in self.config}
        gen = {"eos_token_id": [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]}
        template = self._get("tokenizer.chat_template")
        if self._get("tokenizer.ggml.model") == "gpt2":
            pre = self._get("tokenizer.ggml.pre")
            if add_bos is None:
                add_bos = pre in _BOS_BY_DEFAULT
            text = _byte_level_tokenizer_json(tokens, types, self._get("tokenizer.ggml.merges") or [], pre, ids,
                                              bool(add_bos), bool(add_eos))
            names = tokens
            spm = None
        else:
            # llama.cpp prefixes a space unless the file says not to; Gemma's tokenizer never does (older Gemma
            # files lack the key)
            prefix = self._get("tokenizer.ggml.add_space_prefix", self.arch != "gemma3")
            spm, names = _sentencepiece_model(
                tokens, self._get("tokenizer.ggml.scores"), types, ids, add_dummy_prefix=bool(prefix),
                remove_extra_whitespaces=bool(self._get("tokenizer.ggml.remove_extra_whitespaces", False)))
            text = None
        tcfg = {"add_bos_token": True if add_bos is None else bool(add_bos), "add_eos_token": bool(add_eos)}
        for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                          ("pad_token", "padding")):
            if ids[name] is not None and ids[name] < len(names):
                tcfg[key] = names[ids[name]]
        token_type = None
        if spm is not None:
            token_type = [_FORMAT_TYPE.get(t, NORMAL) for t in types]
            if ids["unknown"] is not None and token_type[ids["unknown"]] == NORMAL:
                token_type[ids["unknown"]] = UNKNOWN
        return build_tokenizer_metadata(config, tcfg, gen, tokenizer_json=text, spm_model=spm,
                                        chat_template=template if isinstance(template, str) else None,
                                        token_type=token_type, origin=f"tokenizer of {self.path}")

    def close(self):
        if getattr(self, "source", None) is not None:
            self.source.close()
        self._reader = None
        self._tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _llama3_factors(wavelen, factor, low, high, original=LLAMA3_ORIGINAL_CONTEXT):
    """per-frequency division factors of llama3 RoPE scaling, as llama.cpp's converter computes them"""
    out = np.empty_like(wavelen)
    for i, w in enumerate(wavelen):
        if w < original / high:
            out[i] = 1.0
        elif w > original / low:
            out[i] = factor
        else:
            smooth = (original / w - low) / (high - low)
            out[i] = 1 / ((1 - smooth) / factor + smooth)
    return out


def _open_reader(path):
    if not os.path.isfile(path):
        raise ConvertError(f"'{path}' does not exist or is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ConvertError(f"'{path}' is not a GGUF file (it does not start with the bytes 'GGUF'); give a llama.cpp "
                           f".gguf file or a Hugging Face model directory")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ConvertError(f"'{path}' is GGUF version {version} (or big-endian); supported: little-endian "
                           f"versions 2 and 3")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConvertError("reading GGUF files needs the 'gguf' package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        raise ConvertError(f"'{path}' is truncated or corrupt: the GGUF reader failed with {type(exc).__name__}: "
                           f"{exc}") from None
    if reader.byte_order != "I":
        raise ConvertError(f"'{path}' is a big-endian GGUF file; only little-endian files are supported")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ConvertError(f"'{path}' is truncated: tensor '{t.name}' ends at byte {t.data_offset + t.n_bytes} of "
                               f"a {size}-byte file")
    return reader


# ---- byte-level BPE (tokenizer.ggml.model "gpt2") -> tokenizer.json ----
def _byte_level_tokenizer_json(tokens, types, merges, pre, ids, add_bos, add_eos):
    """tokenizer.json text for a byte-level BPE vocabulary: vocab + merges, the pre-tokenizer llama.cpp uses for
    `pre`, control tokens as special added tokens, user-defined ones as plain added tokens, and a post-processor
    adding BOS/EOS as tokenizer.ggml.add_bos_token/add_eos_token say."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    to_byte = gpt2_unicode_to_byte()
    byte_char = {b: ch for ch, b in to_byte.items()}
    vocab = {}
    for i, token in enumerate(tokens):
        if not all(ch in to_byte for ch in token):   # stored as raw text: spell it in the byte alphabet
            token = "".join(byte_char[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConvertError(f"merge {merge!r} in tokenizer.ggml.merges is not two tokens")
        pairs.append((parts[0], parts[1]))
    splits, ignore_merges = PRE_TOKENIZERS[pre]
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=ignore_merges))
    except Exception as exc:
        raise ConvertError(f"the GGUF's byte-level BPE vocabulary is inconsistent ({exc})") from None
    if pre in _NORMALIZERS:
        tok.normalizer = getattr(normalizers, _NORMALIZERS[pre])()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens become special added tokens, user-defined ones plain added tokens (both matched whole in the
    # text, as llama.cpp does); one stored outside the byte alphabet was respelled above and is left to the BPE
    special = [AddedToken(t, special=True, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
               if ty == GG_CONTROL and vocab.get(t) == i]
    plain = [AddedToken(t, special=False, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
             if ty == GG_USER_DEFINED and vocab.get(t) == i]
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    single, pair, used = "$A", "$A $B", []
    if add_bos and ids["bos"] is not None:
        bos = tokens[ids["bos"]]
        single, pair = f"{bos} {single}", f"{bos} $A {bos}:1 $B:1"
        used.append((bos, ids["bos"]))
    if add_eos and ids["eos"] is not None:
        eos = tokens[ids["eos"]]
        single, pair = f"{single} {eos}", f"{pair} {eos}:1"
        used.append((eos, ids["eos"]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=list(dict(used).items()))
    return tok.to_str()


# ---- SentencePiece (tokenizer.ggml.model "llama") -> tokenizer.model protobuf ----
# field numbers of sentencepiece_model.proto
_MP_PIECES, _MP_TRAINER, _MP_NORMALIZER = 1, 2, 3
_SP_PIECE, _SP_SCORE, _SP_TYPE = 1, 2, 3
_TS_MODEL_TYPE, _TS_VOCAB_SIZE, _TS_BYTE_FALLBACK = 3, 4, 35
_TS_UNK_ID, _TS_BOS_ID, _TS_EOS_ID, _TS_PAD_ID = 40, 41, 42, 43
_TS_UNK_SURFACE, _TS_UNK_PIECE, _TS_BOS_PIECE, _TS_EOS_PIECE, _TS_PAD_PIECE = 44, 45, 46, 47, 48
_NS_NAME, _NS_ADD_DUMMY_PREFIX, _NS_REMOVE_EXTRA_WS, _NS_ESCAPE_WS = 1, 3, 4, 5
_SPM_BPE = 2


def _varint(n):
    n &= (1 << 64) - 1   # negative int32 values are sign-extended to 64 bits
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_varint(field, value):
    return _varint(field << 3) + _varint(int(value))


def _pb_bytes(field, raw):
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _pb_float(field, value):
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _sentencepiece_model(tokens, scores, types, ids, add_dummy_prefix, remove_extra_whitespaces):
    """A SentencePiece ModelProto (the bytes of a tokenizer.model) for a llama.cpp "llama" vocabulary, and the
    pieces as written. llama.cpp tokenizes these vocabularies as BPE ranked by score, which is SentencePiece's
    BPE model. Returns (model bytes, pieces)."""
    n = len(tokens)
    if scores is None:
        scores = [0.0] * n
    if len(scores) != n:
        raise ConvertError(f"the GGUF has {n} tokens but {len(scores)} scores")
    unk = ids["unknown"]
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == GG_UNKNOWN), None)
    if unk is None or unk >= n:
        raise ConvertError("the GGUF's SentencePiece vocabulary names no unknown token (tokenizer.ggml."
                           "unknown_token_id); SentencePiece needs one")
    pieces, seen, out = [], {}, []
    for i, (token, ty) in enumerate(zip(tokens, types)):
        if ty != GG_BYTE:
            # SentencePiece matches pieces against text whose spaces are already ▁; llama.cpp spells some
            # user-defined pieces (Gemma's runs of spaces) with real spaces
            token = token.replace(" ", "\u2581")
        if ty == GG_UNKNOWN and i != unk:
            ty = GG_CONTROL
        if i == unk:
            ty = GG_UNKNOWN
        if ty not in (GG_NORMAL, GG_UNKNOWN, GG_CONTROL, GG_USER_DEFINED, GG_UNUSED, GG_BYTE):
            ty = GG_NORMAL
        if not token or token in seen:
            raise ConvertError(f"token {i} ({token!r}) of the GGUF's SentencePiece vocabulary is empty or repeats "
                               f"token {seen.get(token)}")
        seen[token] = i
        pieces.append(token)
        body = _pb_bytes(_SP_PIECE, token.encode("utf-8")) + _pb_float(_SP_SCORE, float(scores[i]))
        if ty != GG_NORMAL:
            body += _pb_varint(_SP_TYPE, ty)
        out.append(_pb_bytes(_MP_PIECES, body))
    byte_pieces = {f"<0x{b:02X}>" for b in range(256)}
    byte_fallback = byte_pieces <= set(p for p, t in zip(pieces, types) if t == GG_BYTE)

    def piece(i):
        return pieces[i] if i is not None and 0 <= i < n else None

    trainer = _pb_varint(_TS_MODEL_TYPE, _SPM_BPE) + _pb_varint(_TS_VOCAB_SIZE, n)
    trainer += _pb_varint(_TS_BYTE_FALLBACK, byte_fallback)
    specials = ((_TS_UNK_ID, _TS_UNK_PIECE, unk), (_TS_BOS_ID, _TS_BOS_PIECE, ids["bos"]),
                (_TS_EOS_ID, _TS_EOS_PIECE, ids["eos"]), (_TS_PAD_ID, _TS_PAD_PIECE, ids["padding"]))
    for field_id, field_piece, i in specials:
        ok = piece(i) is not None
        trainer += _pb_varint(field_id, i if ok else -1)
        if ok:
            trainer += _pb_bytes(field_piece, piece(i).encode("utf-8"))
    # an unknown id decodes to its own text, as in transformers, not SentencePiece's default " ⁇ "
    trainer += _pb_bytes(_TS_UNK_SURFACE, pieces[unk].encode("utf-8"))
    normalizer = (_pb_bytes(_NS_NAME, b"identity") + _pb_varint(_NS_ADD_DUMMY_PREFIX, add_dummy_prefix)
                  + _pb_varint(_NS_REMOVE_EXTRA_WS, remove_extra_whitespaces) + _pb_varint(_NS_ESCAPE_WS, True))
    model = b"".join(out) + _pb_bytes(_MP_TRAINER, trainer) + _pb_bytes(_MP_NORMALIZER, normalizer)
    return model, pieces
