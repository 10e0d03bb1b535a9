"""A tiny random Llama in Hugging Face layout (config.json, model.safetensors, tokenizer.json), made in a few
milliseconds with no download: for tests of the converter, the file format and error paths."""
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


def make_tiny_llama(out_dir, n_layers=2, hidden=64, heads=4, kv_heads=2, ff=96, seed=0, dtype="F32", shards=1,
                    vocab=None):
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    tok = make_tokenizer_json()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    vocab = vocab or tok.get_vocab_size()
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": ff, "num_hidden_layers": n_layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "torch_dtype": "float32"}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                   "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}, f)
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
