"""Hugging Face model directory -> one .qrz file.

    python -m convert HF_DIR OUT.qrz --format f32|f16|q8 [--group-size 32]

Streams tensor by tensor (peak memory is about the largest tensor, not the model) and writes under a temporary
name, renamed into place only when complete: a failed or interrupted run leaves no .qrz behind.
"""
import os
import sys

from .errors import ConvertError
from .formats import FORMATS
from .formats import f32 as f32_format
from .hf import TensorSource, check_dtype, read_config
from .qrzfile import QrzWriter, TensorSpec
from .tokenizer import tokenizer_metadata

__all__ = ["convert", "ConvertError", "FORMATS"]

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def _architecture(config):
    names = config.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    if config.get("model_type") == "llama":
        return "llama"
    found = ", ".join(names) or config.get("model_type") or "unknown"
    raise ConvertError(f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(config):
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type != "default":
        raise ConvertError(f"RoPE scaling '{rope_type}' is not supported yet; supported: default")
    return float(theta)


def _llama_metadata(config, source):
    def need(key):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ConvertError(f"config.json lacks a positive integer '{key}'")
        return config[key]

    n_embd, n_heads = need("hidden_size"), need("num_attention_heads")
    n_vocab = source.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in source.where \
        else need("vocab_size")
    return {
        "model.n_vocab": n_vocab,
        "model.n_embd": n_embd,
        "model.n_layers": need("num_hidden_layers"),
        "model.n_heads": n_heads,
        "model.n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "model.head_dim": config.get("head_dim") or n_embd // n_heads,
        "model.n_ff": need("intermediate_size"),
        "model.n_ctx_train": config.get("max_position_embeddings") or 2048,
        "model.rope_theta": _rope(config),
        "model.norm_eps": float(config.get("rms_norm_eps", 1e-6)),
    }


def _llama_tensor_names(n_layers, tied):
    names = ["model.embed_tokens.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if not tied:
        names.append("lm_head.weight")
    return names


def _progress(items, enabled, desc):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="tensor")


def _plain_progress(items, desc):
    step = max(1, len(items) // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == len(items):
            print(f"{desc}: {i}/{len(items)} tensors", file=sys.stderr, flush=True)


def convert(hf_dir, out_path, fmt="f16", group_size=32, progress=True):
    """Convert a Hugging Face model directory into a .qrz. Returns the output path."""
    hf_dir, out_path = os.fspath(hf_dir), os.fspath(out_path)
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"'{hf_dir}' is not a directory; give a Hugging Face model directory")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ConvertError(f"cannot write into '{out_dir}': it does not exist or is not writable")
    fmt_module = FORMATS[fmt]
    if fmt_module.QUANTIZED and (not isinstance(group_size, int) or group_size <= 0):
        raise ConvertError(f"group size must be a positive integer, got {group_size!r}")

    config = read_config(hf_dir)
    arch = _architecture(config)
    source = TensorSource(hf_dir)
    try:
        meta = {"general.architecture": arch,
                "general.name": str(config.get("_name_or_path") or config.get("_model_name_or_path")
                                    or os.path.basename(os.path.abspath(hf_dir))),
                "general.source": os.path.basename(os.path.abspath(hf_dir)),
                "quant.format": fmt,
                "quant.group_size": group_size if fmt_module.QUANTIZED else 0}
        meta.update(_llama_metadata(config, source))
        tied = "lm_head.weight" not in source.where or bool(config.get("tie_word_embeddings", False))
        meta["model.tie_embeddings"] = tied
        meta.update(tokenizer_metadata(hf_dir, config))
        names = _llama_tensor_names(meta["model.n_layers"], tied)

        specs, plans = [], []
        for name in names:
            if name not in source.where:
                raise ConvertError(f"tensor '{name}' is missing from the safetensors files of '{hf_dir}'")
            check_dtype(name, source.dtype(name), source.where[name].path)
            shape = source.shape(name)
            if len(shape) == 2:
                rows, cols = shape
                if fmt_module.QUANTIZED and cols % group_size:
                    raise ConvertError(f"group size {group_size} does not divide in_features {cols} of tensor "
                                       f"'{name}'; choose a group size dividing it")
                group = group_size if fmt_module.QUANTIZED else 0
                specs.append(TensorSpec(name, fmt_module.TYPE_ID, shape, group, fmt_module.nbytes(rows, cols, group)))
                plans.append((name, fmt_module, group))
            elif len(shape) == 1:
                specs.append(TensorSpec(name, f32_format.TYPE_ID, shape, 0, shape[0] * 4))
                plans.append((name, None, 0))
            else:
                raise ConvertError(f"tensor '{name}' has shape {shape}; expected a matrix or a vector")

        try:
            with QrzWriter(out_path, meta, specs) as writer:
                for name, module, group in _progress(plans, progress, f"{fmt} {os.path.basename(out_path)}"):
                    w = source.load(name)
                    data = module.quantize(w, group) if module is not None else f32_format.quantize(w)
                    writer.write_tensor(name, data)
                    del w, data
        except OSError as exc:
            raise ConvertError(f"writing '{out_path}' failed: {exc}")
    finally:
        source.close()
    return out_path
