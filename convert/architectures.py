"""What each supported architecture needs from config.json: the model.* metadata of the .qrz (docs/FORMAT.md), the
tensors to store, and the few values the converter changes on the way.

One runtime graph covers them all; the differences are data. Llama is the base (Mistral and TinyLlama are Llamas;
Mistral may slide its attention window); Qwen2 adds q/k/v biases; Gemma-3 adds q/k norms, norms after attention
and MLP, GELU-tanh, scaled embeddings, its own attention scale, and sliding-window layers with their own RoPE base.
"""
import math

import numpy as np

from .errors import ConvertError
from .qrzfile import ARRAY, F32, KV, U8

# config.json "architectures" entry -> general.architecture
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Gemma3ForCausalLM": "gemma3"}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def architecture(config):
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    found = ", ".join(map(str, names)) or config.get("model_type") or "unknown"
    hint = (" (for Gemma-3's multimodal checkpoints, convert the text model: Gemma3ForCausalLM)"
            if "Gemma3ForConditionalGeneration" in names else "")
    raise ConvertError(f"unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)}{hint}")


def _need_int(config, key):
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConvertError(f"config.json lacks a positive integer '{key}'")
    return value


# ---- RoPE ----

def _default_inv_freq(theta, head_dim):
    # float32 throughout, as transformers computes it: 1 / base^(arange(0, d, 2) / d)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3_inv_freq(inv_freq, params):
    try:
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"llama3 RoPE scaling needs factor, low_freq_factor, high_freq_factor and "
                           f"original_max_position_embeddings ({exc!r} missing or not a number)")
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = (np.float32(1) - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope(params, head_dim, default_theta, where):
    """(theta, inv_freq or None) of one RoPE parameter set; inv_freq only when scaling changes the frequencies"""
    params = params or {}
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConvertError(f"partial rotary embeddings are not supported{where}")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, (_default_inv_freq(theta, head_dim) / np.float32(float(params["factor"]))).astype(np.float32)
    if rope_type == "llama3":
        return theta, _llama3_inv_freq(_default_inv_freq(theta, head_dim), params)
    raise ConvertError(f"RoPE scaling '{rope_type}' is not supported{where}; supported: default, linear, llama3")


def _rope_parameters(config):
    """{"full_attention": params, "sliding_attention": params}, from transformers 5's rope_parameters (flat or per
    layer type) or the older rope_theta / rope_scaling / rope_local_base_freq keys"""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and any(k in params for k in ("full_attention", "sliding_attention")):
        full = dict(params.get("full_attention") or {})
        return full, dict(params.get("sliding_attention") or full)
    full = dict(params) if isinstance(params, dict) else dict(config.get("rope_scaling") or {})
    if "rope_theta" in config:
        full.setdefault("rope_theta", config["rope_theta"])
    if full.get("rope_type", full.get("type")) == "llama3":
        full.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    local = dict(full)
    if "rope_local_base_freq" in config:   # older Gemma-3 configs: the local base, unscaled
        local = {"rope_theta": config["rope_local_base_freq"], "rope_type": "default"}
    return full, local


# ---- sliding windows ----

def _sliding_layers(arch, config, n_layers):
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return 0, [0] * n_layers
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return window, [int(t == "sliding_attention") for t in types]
    if arch == "gemma3":
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
        return window, [int((i + 1) % pattern != 0) for i in range(n_layers)]
    if arch == "qwen2":
        if not config.get("use_sliding_window"):
            return 0, [0] * n_layers
        first = int(config.get("max_window_layers") or 0)
        return window, [int(i >= first) for i in range(n_layers)]
    return window, [1] * n_layers   # Mistral: every layer slides


# ---- metadata and tensors ----

def model_metadata(arch, config, n_vocab):
    """the model.* keys of docs/FORMAT.md for this architecture"""
    n_embd, n_heads = _need_int(config, "hidden_size"), _need_int(config, "num_attention_heads")
    n_layers = _need_int(config, "num_hidden_layers")
    head_dim = config.get("head_dim") or n_embd // n_heads
    act_name = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if act_name not in ACTIVATIONS:
        raise ConvertError(f"activation '{act_name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    if config.get("mlp_bias"):
        raise ConvertError("MLP biases (mlp_bias: true) are not supported")
    meta = {
        "model.n_vocab": n_vocab,
        "model.n_embd": n_embd,
        "model.n_layers": n_layers,
        "model.n_heads": n_heads,
        "model.n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "model.head_dim": head_dim,
        "model.n_ff": _need_int(config, "intermediate_size"),
        "model.n_ctx_train": config.get("max_position_embeddings") or 2048,
        "model.norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "model.activation": ACTIVATIONS[act_name],
    }
    full, local = _rope_parameters(config)
    theta, inv_freq = _rope(full, head_dim, 10000.0, "")
    meta["model.rope_theta"] = KV(F32, theta)
    if inv_freq is not None:
        meta["model.rope_inv_freq"] = KV(ARRAY, inv_freq.tolist(), F32)
    window, sliding = _sliding_layers(arch, config, n_layers)
    if window:
        meta["model.sliding_window"] = window
        meta["model.sliding_layers"] = KV(ARRAY, sliding, U8)
        if local != full:
            theta_local, inv_freq_local = _rope(local, head_dim, theta, " (sliding-window layers)")
            meta["model.rope_theta_local"] = KV(F32, theta_local)
            if inv_freq_local is not None:
                meta["model.rope_inv_freq_local"] = KV(ARRAY, inv_freq_local.tolist(), F32)
    if arch == "gemma3":
        if config.get("use_bidirectional_attention"):
            raise ConvertError("bidirectional attention (use_bidirectional_attention: true, an embedding model's "
                               "setting) is not supported: pyqrt runs causal language models")
        if config.get("attn_logit_softcapping") is not None:
            raise ConvertError("attention logit soft-capping (attn_logit_softcapping) is not supported")
        meta["model.embed_scale"] = KV(F32, float(np.float32(n_embd ** 0.5)))
        meta["model.attn_scale"] = KV(F32, float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5)
    if config.get("final_logit_softcapping") is not None:
        meta["model.logit_softcap"] = KV(F32, float(config["final_logit_softcapping"]))
    return meta


GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")


def tensor_names(arch, n_layers, tied, available):
    """the tensors the runtime reads, in file order; `available` is the set of names the source has"""
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        norms = GEMMA_NORMS if arch == "gemma3" else ("input_layernorm", "post_attention_layernorm")
        names += [p + n + ".weight" for n in norms]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        for x in "qkv":
            if arch == "qwen2" or p + f"self_attn.{x}_proj.bias" in available:
                names.append(p + f"self_attn.{x}_proj.bias")
        if p + "self_attn.o_proj.bias" in available:
            raise ConvertError("an output-projection bias (self_attn.o_proj.bias) is not supported")
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    names.append("model.norm.weight")
    if not tied:
        names.append("lm_head.weight")
    return names


def transform(arch, name, w):
    """a tensor as the runtime wants it: Gemma's RMSNorm scales by (1 + w), stored here as the factor itself so
    every architecture's norm is plain weight * normalized"""
    if arch == "gemma3" and (name == "model.norm.weight" or any(f".{n}.weight" in name for n in GEMMA_NORMS)):
        return (w.astype(np.float32) + np.float32(1.0)).astype(np.float32)
    return w
