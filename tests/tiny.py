"""Tiny random models in Hugging Face layout (config.json, model.safetensors, tokenizer.json), made in
milliseconds with no download: make_tiny_llama writes a Llama with numpy alone (tests of the converter, the file
format and error paths); make_tiny_hf has transformers build and save any supported architecture (tests of the
runtime against transformers, tests/test_architectures.py)."""
import copy
import json
import os

import numpy as np

TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world! Tokenizers split text into pieces.",
        "東京 café naïve 🚀 1234567890", "def f(x):\n    return x * 2\n"] * 4


def make_tokenizer_json(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return tok


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(out_dir):
    """tokenizer.json (the byte-level BPE of make_tokenizer_json) and tokenizer_config.json; returns the
    vocabulary size, which the model's embedding must match"""
    tok = make_tokenizer_json()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}, f)
    return tok.get_vocab_size()


def make_tiny_llama(out_dir, n_layers=2, hidden=64, heads=4, kv_heads=2, ff=96, seed=0, dtype="F32", shards=1,
                    vocab=None):
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    n_tokens = write_tokenizer(out_dir)
    vocab = vocab or n_tokens
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ff, "num_hidden_layers": n_layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "torch_dtype": "float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    t = {"model.embed_tokens.weight": mat(vocab, hidden), "model.norm.weight": 1 + 0.1 * rng.standard_normal(hidden),
         "lm_head.weight": mat(vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(hidden),
                  p + "self_attn.q_proj.weight": mat(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, hidden),
                  p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, hidden),
                  p + "self_attn.o_proj.weight": mat(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": mat(ff, hidden), p + "mlp.up_proj.weight": mat(ff, hidden),
                  p + "mlp.down_proj.weight": mat(hidden, ff)})
    t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}
    if dtype == "BF16":   # round to bfloat16 (nearest even), stored as raw uint16 with a BF16 header
        t = {k: _to_bf16_bits(v) for k, v in t.items()}
    names = sorted(t)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for s in range(shards):
        part = {k: t[k] for k in names[s * per:(s + 1) * per]}
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        path = os.path.join(out_dir, fname)
        if dtype == "BF16":
            _save_bf16(part, path)
        else:
            save_file(part, path)
        weight_map.update({k: fname for k in part})
    if shards > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(out_dir)


def _to_bf16_bits(x):
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _save_bf16(tensors, path):
    """safetensors' numpy writer has no bfloat16: write the file by its spec (u64 header size, JSON, data)"""
    header, offset, blobs = {}, 0, []
    for name, bits in tensors.items():
        raw = np.ascontiguousarray(bits, "<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- tiny random models of other architectures, made by transformers itself ----
# (the module and class names are looked up in transformers; the shapes are the smallest that still exercise
# each architecture's features: grouped-query attention, a head_dim of its own, several windows per sequence)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                     sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                   tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    query_pre_attn_scalar=24, rms_norm_eps=1e-6, sliding_window=8,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                    tie_word_embeddings=True)),
}
DROP = object()   # in make_tiny_hf's config_edits: remove the key from config.json


def make_tiny_hf(out_dir, arch, seed=0, config_edits=None, **overrides):
    """A tiny random `arch` model ("llama", "mistral", "qwen2", "gemma3") saved by transformers'
    save_pretrained as float32 safetensors, with the tokenizer of make_tokenizer_json. `overrides` go to the
    transformers config class; `config_edits` ({key: value or DROP}) are then applied to the written config.json,
    to reproduce config files as they are found on the Hub (older key names) rather than as this transformers
    version writes them.

    Weights are redrawn at unit scale (transformers initialises with std 0.02, which makes attention nearly
    uniform and hides errors of scale, RoPE or masking): matrices N(0, 1/fan_in), embeddings N(0, 1) (Gemma:
    N(0, 1/hidden), since it multiplies them by sqrt(hidden)), biases N(0, 0.25), norm weights 1 + N(0, 0.04)
    (Gemma's zero-centred norms, which multiply by 1 + w: N(0, 0.09))."""
    import torch
    import transformers
    config_cls, model_cls, defaults = ARCHITECTURES[arch]
    kw = dict(vocab_size=None, hidden_size=64, intermediate_size=96, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=None, **defaults)
    kw = copy.deepcopy(dict(kw, **overrides))   # transformers' configs edit rope dicts in place
    os.makedirs(out_dir, exist_ok=True)
    kw["vocab_size"] = kw["vocab_size"] or write_tokenizer(out_dir)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw)).eval()
    randomize_weights(model, seed, gemma=arch == "gemma3")
    model.save_pretrained(out_dir)
    if config_edits:
        edit_config(out_dir, config_edits)
    return str(out_dir)


def randomize_weights(model, seed, gemma=False):
    """unit-scale weights (make_tiny_hf's docstring); gemma: zero-centred norm weights, and embeddings that
    become unit-scale after Gemma's multiplication by sqrt(hidden)"""
    import torch
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():   # a tied lm_head is the embedding: listed once
            r = torch.randn(p.shape, generator=g)
            if "embed_tokens" in name:
                p.copy_(r * (hidden ** -0.5 if gemma else 1.0))
            elif p.ndim == 2:
                p.copy_(r * p.shape[1] ** -0.5)
            elif name.endswith("norm.weight"):
                p.copy_(0.3 * r if gemma else 1 + 0.2 * r)
            else:
                p.copy_(0.5 * r)


def edit_config(model_dir, edits):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in edits.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
