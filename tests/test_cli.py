"""The command line: inspect, run and chat (chat driven through stdin, as a pipe)."""
import subprocess
import sys

import pytest

from convert import convert
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_qrz(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return str(convert(make_tiny_llama(d / "hf"), d / "tiny.qrz", fmt="f16", progress=False))


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pyqrt", *args], capture_output=True, text=True, input=stdin,
                          timeout=120)


def test_inspect_lists_metadata_and_tensors(tiny_qrz):
    r = _run("inspect", tiny_qrz)
    assert r.returncode == 0, r.stderr
    assert "general.architecture = 'llama'" in r.stdout and "model.layers.1.mlp.down_proj.weight" in r.stdout
    assert "f16" in r.stdout and ".qrz version 1" in r.stdout


def test_run_prints_a_continuation(tiny_qrz):
    r = _run("run", tiny_qrz, "-p", "Hello world", "-n", "8", "--temp", "0", "--ignore-eos", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "generated 8 tokens" in r.stderr


def test_chat_keeps_the_conversation(tiny_qrz):
    r = _run("chat", tiny_qrz, "-n", "6", "--temp", "0", stdin="Hello\nAnd again\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n").split("\n")) >= 2


def test_bad_arguments_exit_2(tiny_qrz):
    assert _run("run", tiny_qrz, "-p", "x", "--top-p", "3").returncode == 2
    assert _run("run", tiny_qrz).returncode == 2          # missing -p: argparse
    assert _run("bogus").returncode == 2
