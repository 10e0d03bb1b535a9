"""The NEON kernels (native/kernels_neon.c) against the scalar C reference and numpy, on AArch64.

On an x86-64 machine the kernels cannot run in-process, so tests/native/kernel_check.c is cross-compiled with
the C core (aarch64-linux-gnu-gcc -static) and run under qemu-user, twice: as a CPU with the dot-product
extension (`-cpu max`, the SDOT kernels) and as one without it (`-cpu cortex-a57`, the plain NEON kernels). On an
aarch64 host the driver is built with the native compiler and run directly.

Python writes the cases (weights encoded by convert.formats, float32 activations), the driver runs each through
the scalar and the NEON kernel (and the NEON kernel again over three row slices, as the thread pool splits a
matmul) and writes the outputs back. The numpy references here re-derive the activation codes exactly as the C
quantizers do (docs/QUANTIZATION.md), so:
  - SDR (W4A8 and W4A4): numpy == scalar == NEON, bit for bit (integer totals, one float multiply);
  - Q8 / INT4: NEON == scalar bit for bit (same integer group sums, same float ops in the same order), and both
    within float-rounding distance of the float64 reference;
  - FP4: numpy's float32 replay of the scalar kernel (exact integer group sums, then acc += d_g * sum_g in group
    order, times the row's activation scale) == scalar == NEON, bit for bit, and all within float-rounding
    distance of the float64 reference;
  - SQ: NEON == scalar bit for bit (the INT4 group sums plus the group's slot sums in the same int32 total, then
    the same float ops in the same order), and both within float-rounding distance of the float64 reference (the
    codes with the slot values added at their positions, exact integer group sums);
  - F32 / F16 and the attention vectors: within float-rounding distance (the summation order differs).

Without the cross compiler or qemu the tests skip, naming the missing tool; with CI set they fail instead
(.ci/run installs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user).
"""
import hashlib
import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest

from convert.formats import f16 as f16_format
from convert.formats import fp4 as fp4_format
from convert.formats import int4 as int4_format
from convert.formats import nibbles
from convert.formats import q8 as q8_format
from convert.formats import sdr as sdr_format
from convert.formats import sq as sq_format
from convert.formats import align64
from tests.test_kernels import make_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(ROOT, "native")
DRIVER = os.path.join(ROOT, "tests", "native", "kernel_check.c")
# the C core minus the model and the token loop: the block-format table, the CPU layer, half floats and logging
# (if these come to need more of the core, the build retries with every native/*.c)
CORE_SOURCES = ["types.c", "cpu.c", "file.c", "kernels_neon.c"]
# as pyqrt/_build.py compiles the module (ISO C: no float multiply-add contraction)
CFLAGS = ["-O3", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Wno-unused-parameter"]

TYPE_IDS = {"f32": 0, "f16": 1, "q8": 2, "sdr": 3, "int4": 4, "fp4": 5, "sq": 6}
ISA_SCALAR, ISA_NEON = 0, 2
NATIVE_HOST = platform.machine().lower() in ("aarch64", "arm64")
# qemu CPU models: (name, SDOT expected); a native host runs once, as whatever it is
CPUS = [("native", None)] if NATIVE_HOST else [("max", 1), ("cortex-a57", 0)]


# ---- toolchain ----
def _toolchain():
    """-> (compiler argv, runner argv prefix, missing-tool message or None)"""
    if NATIVE_HOST:
        cc = os.environ.get("CC", "cc")
        return [cc], [], None if shutil.which(cc) else f"no C compiler '{cc}'"
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    missing = [name for name, path in (("aarch64-linux-gnu-gcc", cc), ("qemu-aarch64", qemu)) if not path]
    if missing:
        return None, None, (f"needs {' and '.join(missing)} to run the NEON kernels on this {platform.machine()} "
                            "machine (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)")
    return [cc, "-static"], [qemu], None


def _unavailable(msg):
    if os.environ.get("CI"):   # .ci/run installs the toolchain: there a skip would hide a broken setup
        pytest.fail(f"CI: {msg}")
    pytest.skip(msg)


def _build_driver():
    cc, runner, missing = _toolchain()
    if missing:
        _unavailable(missing)
    sources = [DRIVER] + [os.path.join(NATIVE, s) for s in CORE_SOURCES]
    everything = [DRIVER] + sorted(os.path.join(NATIVE, f) for f in os.listdir(NATIVE) if f.endswith(".c"))
    key = hashlib.sha256()
    for path in everything + sorted(os.path.join(NATIVE, h) for h in os.listdir(NATIVE) if h.endswith(".h")):
        key.update(path.encode() + b"\0" + open(path, "rb").read())
    key.update(" ".join(cc + CFLAGS).encode())
    out_dir = os.path.join(tempfile.gettempdir(), "pyqrt-neon-check")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, f"kernel_check-{key.hexdigest()[:16]}")
    if not os.path.exists(exe):
        tmp = f"{exe}.{os.getpid()}.tmp"
        cmd = cc + CFLAGS + ["-I", NATIVE, *sources, "-lm", "-lpthread", "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 and "undefined reference" in res.stderr:
            cmd = cc + CFLAGS + ["-I", NATIVE, *everything, "-lm", "-lpthread", "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            if "cannot find" in res.stderr and not NATIVE_HOST:   # the compiler without the arm64 libc
                _unavailable(f"aarch64 link failed (libc6-dev-arm64-cross missing?): {res.stderr.strip()[-400:]}")
            pytest.fail(f"building the NEON check driver failed:\n{' '.join(cmd)}\n{res.stderr}")
        os.replace(tmp, exe)
        for stale in os.listdir(out_dir):   # builds of earlier sources
            if stale.startswith("kernel_check-") and os.path.join(out_dir, stale) != exe:
                try:
                    os.remove(os.path.join(out_dir, stale))
                except OSError:
                    pass
    return exe, runner


# ---- weights and activations ----
def _weight(kind, rows, cols, rng):
    # "raw", "max" and "min" (FP4: "raw-w1a3d", "max-w3a2"; SQ: "raw-k2", "min-k32") start from random weights whose
    # codes the case then overwrites; SQ's converter kinds carry the slot count too ("outlier-k4")
    base = kind.split("-")[0]
    return make_weight("random" if base in ("raw", "max", "min") else base, rows, cols, rng)


def _acts(kind, n, cols, rng, hot=None):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    if kind == "zerorow":    # an all-zero row has a zero scale: exact zeros, not NaN
        x[0] = 0.0
    elif kind == "extremes":
        x = rng.choice(np.array([-3.0e4, -2.0, 0.0, 0.5, 3.0e4], np.float32), size=(n, cols))
    elif kind == "outlier":
        x *= 0.01
        x[np.arange(n), rng.integers(0, cols, n)] = -50.0
    elif kind == "max":      # every code at its most negative: the largest products and totals
        x[:] = -1.0
    elif kind == "hotmax":   # SQ act="4bit" (hot: the weight's hot plane): one group scale puts the cold lanes at -7
        x[:] = -1.0          # and the hot ones at -127, the largest codes the 4-bit path gives both
        if hot is not None:
            x[:, hot.astype(bool)] = np.float32(-127 / 7)
    elif kind != "random":
        raise ValueError(kind)
    return x


def _encode(type_name, wkind, w, group, rng):
    """-> (tensor bytes, decoded parts for the reference)"""
    rows, cols = w.shape
    if type_name == "f32":
        return np.ascontiguousarray(w, np.float32).view(np.uint8).ravel(), {"w": w}
    if type_name == "f16":
        return f16_format.quantize(w), {"w": w.astype(np.float16).astype(np.float32)}
    ng = cols // group
    if type_name == "q8":
        buf = q8_format.quantize(w, group)
        d = buf[:rows * ng * 2].view("<f2").astype(np.float32).reshape(rows, ng)
        q = buf[align64(rows * ng * 2):].view(np.int8).reshape(rows, cols)
        return buf, {"d": d, "q": q}
    if type_name == "int4":
        if wkind == "raw":   # random codes and scales straight into the layout
            d16 = (rng.random((rows, ng)) * 2 - 0.5).astype(np.float16)
            m = rng.integers(-8, 8, (rows, cols))
        elif wkind == "max":
            d16 = np.full((rows, ng), 1.0, np.float16)
            m = np.full((rows, cols), -8)
        else:
            buf = int4_format.quantize(w, group)
            d16 = buf[:rows * ng * 2].view("<f2").reshape(rows, ng)
            m = nibbles.unpack(buf[align64(rows * ng * 2):], rows, cols)
        buf = np.zeros(int4_format.nbytes(rows, cols, group), np.uint8)
        buf[:rows * ng * 2] = d16.astype("<f2").reshape(-1).view(np.uint8)
        buf[align64(rows * ng * 2):] = nibbles.pack(m).reshape(-1)
        return buf, {"d": d16.astype(np.float32), "q": np.asarray(m, np.int64)}
    if type_name == "sdr":
        if wkind == "raw":   # every shift the format stores (0..4) with random mantissas and row scales
            s = (rng.random(rows) * 0.1 + 1e-3).astype(np.float32)
            e = rng.integers(0, 5, (rows, ng)).astype(np.uint8)
            m = rng.integers(-8, 8, (rows, cols)).astype(np.int8)
            buf = sdr_format.pack(s, e, m, group)
        elif wkind == "max":
            buf = sdr_format.pack(np.full(rows, 0.5, np.float32), np.full((rows, ng), 4, np.uint8),
                                  np.full((rows, cols), -8, np.int8), group)
        else:
            buf = sdr_format.quantize(w, group)
        s, e, m = sdr_format.unpack(buf, rows, cols, group)
        return buf, {"s": s.astype(np.float32), "e": e.astype(np.int64), "m": m.astype(np.int64)}
    if type_name == "fp4":
        layout = re.fullmatch(r"(raw|max)-w(\d)a(\d)([sdg]?)", wkind)
        if layout is None:   # what the converter writes: its searched weight layout, E2M1 per group, no offsets
            buf = fp4_format.quantize(w, group)
        else:
            how, e_w, e_a = layout[1], int(layout[2]), int(layout[3])
            if how == "raw":   # random codes, scales, offsets and activation scale in the chosen layouts
                d16 = (rng.random((rows, ng)) * 2 - 0.5).astype(np.float16)
                codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
                shifts = rng.integers(0, fp4_format.max_act_shift(e_a) + 1, cols).astype(np.uint8)
                top = float(fp4_format.codebook(e_a)[-1])
                mode = {"d": fp4_format.DYNAMIC, "g": fp4_format.GROUPED, "s": fp4_format.STATIC}[layout[4]]
                scale = 2.5 / top if mode == fp4_format.STATIC else float(rng.choice([1.0, 0.7, 0.3]))
                # static: |x| = 2.5 at the top code; dynamic (row or group): a clipping ratio
            else:              # every code the most negative: with "max" activations, the largest sums
                d16 = np.ones((rows, ng), np.float16)
                codes = np.full((rows, cols), 15, np.uint8)
                shifts = np.zeros(cols, np.uint8)                      # every lane top << K
                mode, scale = fp4_format.DYNAMIC, 1.0
            buf = fp4_format.pack(e_w, d16, codes, e_a, mode, scale, shifts)
        p = fp4_format.unpack(buf, rows, cols, group)
        wl = fp4_format.signed_lut(p["e_w"])[p["codes"]].astype(np.int64)
        return buf, {"wl": wl, "d": p["d16"].astype(np.float32), **{k: p[k] for k in ("e_a", "mode", "scale", "shifts")}}
    if type_name == "sq":
        how, k = re.fullmatch(r"([a-z]+)-k(\d+)", wkind).groups()
        k = int(k)
        if how == "raw":     # random scales, codes, slots and hot channels straight into the layout
            d16 = (rng.random((rows, ng)) * 2 - 0.5).astype(np.float16)
            codes = rng.integers(-8, 8, (rows, ng, group))
            pos = rng.integers(0, group, (rows, ng, k)).astype(np.uint8)
            if k >= 2:       # half the groups with two slots on one position (the format adds their values)
                pos[:, :, 1] = np.where(rng.random((rows, ng)) < 0.5, pos[:, :, 0], pos[:, :, 1])
            high = rng.integers(-8, 8, (rows, ng, k))
            buf = sq_format.pack_stored(d16, codes, high, pos, (rng.random(cols) < 0.1).astype(np.uint8),
                                        float(rng.choice([1.0, 0.9, 0.75])), int(rng.integers(0, 2)))
        elif how in ("max", "min"):   # every code and slot high part at an extreme, the slots on hot channels (many
            # on one position when k is large): against "max" / "hotmax" activations the largest positive (max: -8
            # and 16 * -8) or negative (min: 7 and 16 * 7) group sums
            hot = np.zeros(cols, np.uint8)
            hot[3::8] = 1
            pos = rng.choice(np.arange(3, group, 8), (rows, ng, k)).astype(np.uint8)
            codes = np.full((rows, ng, group), -8 if how == "max" else 7)
            high = np.full((rows, ng, k), -8 if how == "max" else 7)
            buf = sq_format.pack_stored(np.ones((rows, ng), np.float16), codes, high, pos, hot, 1.0,
                                        int(rng.integers(0, 2)))
        else:                # the converter's output, calibrated on sample rows with a few loud channels
            samples = rng.standard_normal((16, cols)).astype(np.float32)
            samples[:, rng.integers(0, cols, max(1, cols // 32))] *= 30
            calib = sq_format.Calibration(gram=samples.T @ samples / len(samples), absmax=np.abs(samples).max(axis=0),
                                          samples=samples)
            buf = sq_format.quantize(w, group, calib=calib, sparse=k / group)
        p = sq_format.unpack(buf, rows, cols, group)
        assert p["k"] == k and buf.size == sq_format.nbytes(rows, cols, group, k)
        # the integer each weight is in its group's unit: its code plus the values of the slots at its position
        u = p["q"].astype(np.int64).reshape(rows, ng, group).copy()
        r_idx, g_idx = np.meshgrid(np.arange(rows), np.arange(ng), indexing="ij")
        for s in range(k):
            np.add.at(u, (r_idx, g_idx, p["pos"][:, :, s].astype(np.int64)), p["vals"][:, :, s].astype(np.int64))
        return buf, {"d": p["d16"].astype(np.float32), "q": u.reshape(rows, cols), "hot": p["hot"], "clip": p["clip"],
                     "grid": p["grid"]}
    raise ValueError(type_name)


# ---- numpy twins of the C activation quantizers (native/types.c, docs/QUANTIZATION.md) ----
def _inverse(d):
    return np.where(d > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0)).astype(np.float32)


def quantize_acts_group(x, group, qmax, lo, hi):
    """Q8_GROUP (qmax 127, +-127) / Q4_GROUP (qmax 7, -8..7) -> (codes int64 (n, cols), scales f32 (n, ng))"""
    n, cols = x.shape
    g = x.reshape(n, cols // group, group)
    d = (np.abs(g).max(axis=2) / np.float32(qmax)).astype(np.float32)
    q = np.clip(np.rint(g * _inverse(d)[:, :, None]), lo, hi)
    return q.astype(np.int64).reshape(n, cols), d


def quantize_acts_i8_row(x):
    """I8_ROW -> (codes (n, cols), scales (n,))"""
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    return np.rint(x * _inverse(d)[:, None]).astype(np.int64), d


def quantize_acts_sdr4_row(x, group):
    """SDR4_ROW -> (codes (n, cols) in -8..7, scales (n,), shifts (n, ng) in 0..12)"""
    n, cols = x.shape
    d = (np.abs(x).max(axis=1) / np.float32(32767)).astype(np.float32)
    base = np.clip(np.rint(x * _inverse(d)[:, None]), -32767, 32767).astype(np.int64).reshape(n, cols // group, group)
    mx = np.bitwise_or.reduce(np.abs(base), axis=2)
    shift = np.maximum(sdr_format.leading_one(mx) - 2, 0)
    step = (np.float32(1) / (np.float32(2) ** shift.astype(np.float32))).astype(np.float32)
    q = np.clip(np.rint(base.astype(np.float32) * step[:, :, None]), -8, 7)
    return q.astype(np.int64).reshape(n, cols), d, shift


def _group_sums(wq, xq, group):
    """int64 [n][rows][ng]: sum over each group of w code * x code"""
    rows, cols = wq.shape
    n = xq.shape[0]
    return np.einsum("ngk,rgk->nrg", xq.reshape(n, cols // group, group).astype(np.int64),
                     wq.reshape(rows, cols // group, group).astype(np.int64))


def reference(type_name, group, act_bits, parts, x):
    """-> (want float64 (n, rows), bound float64 (n, rows), exact float32 (n, rows) or None)"""
    if type_name in ("f32", "f16"):
        w = parts["w"].astype(np.float64)
        want = x.astype(np.float64) @ w.T
        return want, 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30, None
    if type_name in ("q8", "int4", "sq"):   # SQ's q: the codes with the slot values added
        if type_name == "int4" and act_bits == 4:
            xq, xd = quantize_acts_group(x, group, 7, -8, 7)
        elif type_name == "sq" and act_bits == 4:
            xq, xd = sq_format.quantize_acts(x, parts["hot"], group, parts["clip"], parts["grid"])
        else:
            xq, xd = quantize_acts_group(x, group, 127, -127, 127)
        sums = _group_sums(parts["q"], xq, group)
        assert np.abs(sums).max(initial=0) < 2 ** 31, "test data outside the kernels' documented int32 range"
        terms = parts["d"][None, :, :].astype(np.float64) * xd[:, None, :].astype(np.float64) * sums
        return terms.sum(axis=2), 1e-5 * np.abs(terms).sum(axis=2) + 1e-30, None
    if type_name == "fp4":
        if act_bits == 4:
            xq, xd = fp4_format.quantize_acts(x, parts["e_a"], parts["mode"], parts["scale"], parts["shifts"], group)
        else:
            xq, xd = quantize_acts_group(x, group, 127, -127, 127)
        sums = _group_sums(parts["wl"], xq, group)
        assert np.abs(sums).max(initial=0) < 2 ** 31, "test data outside the kernels' documented int32 range"
        # the scalar kernel's float32 ops in its order: acc += (d_w,g * d_x,g) * (float)sum_g over the groups, then
        # acc * d_x,row; a row scale has d_x,g = 1, a group scale d_x,row = 1 (both exact multiplies)
        ng = sums.shape[2]
        grouped = xd.ndim == 2
        x_g = xd.astype(np.float32) if grouped else np.ones((len(x), ng), np.float32)
        x_row = np.ones(len(x), np.float32) if grouped else xd.astype(np.float32)
        d_w = parts["d"]
        acc = np.zeros(sums.shape[:2], np.float32)
        for g in range(ng):
            acc = acc + (d_w[None, :, g] * x_g[:, None, g]) * sums[:, :, g].astype(np.float32)
        exact = (acc * x_row[:, None]).astype(np.float32)
        terms = d_w[None].astype(np.float64) * x_g[:, None, :].astype(np.float64) * sums
        scale = np.abs(x_row).astype(np.float64)[:, None]
        return terms.sum(axis=2) * x_row[:, None], 1e-5 * np.abs(terms).sum(axis=2) * scale + 1e-30, exact
    # SDR: exact integer totals, then (float)total * (s_w * d_x) in float32
    if act_bits == 4:
        xq, xd, xe = quantize_acts_sdr4_row(x, group)
        shifts = parts["e"][None, :, :] + xe[:, None, :]
    else:
        xq, xd = quantize_acts_i8_row(x)
        shifts = np.broadcast_to(parts["e"][None, :, :], (x.shape[0],) + parts["e"].shape)
    sums = _group_sums(parts["m"], xq, group)
    shifted = sums << shifts
    total = shifted.sum(axis=2)
    flush = 256 // group   # the kernels' int32 accumulator holds 256 columns' worth of shifted sums
    ng = shifted.shape[2]
    chunks = np.add.reduceat(shifted, np.arange(0, ng, flush), axis=2) if act_bits == 4 else total[:, :, None]
    assert np.abs(chunks).max() < 2 ** 31, "test data outside the kernels' documented int32 range"
    scale = (parts["s"][None, :] * xd[:, None]).astype(np.float32)
    exact = (total.astype(np.float32) * scale).astype(np.float32)
    return exact.astype(np.float64), np.zeros_like(exact, np.float64), exact


# ---- the cases ----
def _matmul_specs():
    specs = []
    wk_float = ["random", "zeros", "extremes", "tiny"]
    for t in ("f32", "f16"):
        for k, (rows, cols, n) in enumerate([(7, 37, 1), (33, 96, 5), (16, 576, 8), (1, 3, 2), (5, 65, 3),
                                             (9, 17, 65), (4, 40, 4), (3, 1, 1), (6, 13, 7)]):
            for j, wk in enumerate(wk_float):
                specs.append((t, 0, 8, rows, cols, n, wk, ["random", "zerorow", "extremes", "outlier"][(k + j) % 4]))
    xkinds = ["random", "zerorow", "extremes", "outlier", "max"]
    q8_shapes = {8: [(7, 64, 1), (5, 24, 3)], 16: [(7, 64, 1), (5, 48, 3), (3, 192, 65)],
                 24: [(5, 48, 5), (9, 96, 4)], 32: [(33, 96, 5), (1, 64, 4), (6, 128, 8)],
                 48: [(4, 96, 6), (5, 576, 3)], 64: [(16, 576, 7), (3, 64, 1)], 576: [(2, 576, 1), (5, 576, 5)]}
    nib_shapes = {16: [(7, 64, 1), (5, 96, 3), (3, 192, 65), (33, 32, 5)],
                  32: [(33, 96, 5), (1, 64, 4), (6, 128, 8)],
                  48: [(4, 96, 6), (5, 576, 3)],
                  64: [(16, 576, 7), (3, 64, 1), (7, 192, 5)],
                  128: [(3, 256, 4), (5, 384, 1)],
                  256: [(3, 256, 3), (2, 768, 5)]}
    wk_q = ["random", "zeros", "extremes", "outlier", "tiny"]
    for group, shapes in q8_shapes.items():
        for k, (rows, cols, n) in enumerate(shapes):
            for j, wk in enumerate(wk_q):
                specs.append(("q8", group, 8, rows, cols, n, wk, xkinds[(k + j) % 5]))
    for t, max_group in (("int4", 128), ("sdr", 256)):
        for act_bits in (8, 4):
            for group, shapes in nib_shapes.items():
                if group > max_group:
                    continue
                for k, (rows, cols, n) in enumerate(shapes):
                    for j, wk in enumerate(wk_q + ["raw", "max"]):
                        specs.append((t, group, act_bits, rows, cols, n, wk, xkinds[(k + j + act_bits) % 5]))
    # SDR totals beyond int32: W4A4 must move its int32 accumulator into the int64 total every 256 columns
    for group in (16, 64, 256):
        specs.append(("sdr", group, 4, 3, 2048, 2, "max", "max"))
        specs.append(("sdr", group, 8, 3, 2048, 2, "max", "max"))
    specs.append(("int4", 32, 8, 3, 2048, 2, "max", "max"))
    specs.append(("q8", 32, 8, 3, 2048, 2, "extremes", "max"))
    # FP4: groups of 32, 64, 96 and per channel (group = cols); weight rows and activation rows hitting every tile
    # tail; the converter's output for each weight kind, then random codes in each weight layout (with activation
    # layouts and static / dynamic scales cycling over the shapes), then every code at the top magnitude
    fp4_shapes = {32: [(7, 64, 1), (33, 96, 5), (6, 128, 8), (1, 32, 3), (4, 576, 65)],
                  64: [(16, 576, 7), (3, 64, 2), (5, 192, 4)],
                  96: [(4, 96, 6), (5, 576, 3), (9, 192, 1)],
                  "cols": [(2, 32, 1), (7, 96, 5), (6, 576, 4), (3, 2048, 3)]}
    for act_bits in (8, 4):
        k = 0
        for group, shapes in fp4_shapes.items():
            for rows, cols, n in shapes:
                kinds = list(wk_q)
                for e_w in (1, 2, 3):
                    kinds.append(f"raw-w{e_w}a{(e_w + k) % 3 + 1}{'sdg'[(e_w + k + act_bits // 4) % 3]}")
                kinds.append(f"max-w{k % 3 + 1}a{(k + 1) % 3 + 1}")
                for j, wk in enumerate(kinds):
                    specs.append(("fp4", cols if group == "cols" else group, act_bits, rows, cols, n, wk,
                                  xkinds[(k + j + act_bits) % 5]))
                k += 1
    # FP4 largest sums: top weights x extreme lanes; int16 pairs up to 2 * 64 * 127 (dot16_mull) and, with a
    # 2^16-column group, an int32 group sum of 64 * 127 * 2^16 (the scalar kernel's documented limit)
    for e_w in (1, 2, 3):
        for act_bits in (8, 4):
            specs.append(("fp4", 4096, act_bits, 3, 4096, 2, f"max-w{e_w}a2", "max"))
    for e_a in (1, 3):
        specs.append(("fp4", 4096, 4, 3, 4096, 2, f"max-w3a{e_a}", "max"))
    specs.append(("fp4", 32, 8, 5, 2048, 2, "max-w3a2", "max"))
    for act_bits in (8, 4):
        specs.append(("fp4", 1 << 16, act_bits, 2, 1 << 16, 1, "max-w3a2", "max"))
    # SQ: every group size with 0, 1, 2, 4 and G slots per group; for each (group, k, act_bits) the converter's
    # output for each weight kind, random codes / slots / hot channels, and every code and slot at an extreme against
    # the extreme activation codes ("max" for 8-bit, "hotmax" for 4-bit), over weight and activation row counts
    # hitting every tile tail (each group's first shape runs 1x4, 4x1 and 1x1 tiles)
    sq_shapes = {32: [(7, 64, 5), (1, 96, 3), (6, 128, 8), (3, 192, 65)],
                 64: [(5, 192, 6), (2, 64, 1), (9, 128, 4)],
                 96: [(6, 192, 7), (3, 96, 2), (4, 576, 5)],
                 128: [(7, 256, 9), (4, 384, 1), (2, 128, 3)],
                 256: [(5, 512, 6), (1, 256, 4), (10, 256, 3)]}
    step = 0
    for act_bits in (8, 4):
        x_max = "max" if act_bits == 8 else "hotmax"
        for group, shapes in sq_shapes.items():
            for k in (0, 1, 2, 4, group):
                for j, how in enumerate(wk_q + ["raw", "max", "min"]):
                    rows, cols, n = shapes[(j + step) % len(shapes)]
                    xk = x_max if how in ("max", "min") else xkinds[(j + step) % 5]
                    specs.append(("sq", group, act_bits, rows, cols, n, f"{how}-k{k}", xk))
                step += 1
    # SQ largest sums over long rows: G slots per group at 16 * -8 (or 16 * 7) on top of the extreme codes
    for group in (32, 256):
        for act_bits in (8, 4):
            x_max = "max" if act_bits == 8 else "hotmax"
            for how in ("max", "min"):
                specs.append(("sq", group, act_bits, 5, 2048, 5, f"{how}-k{group}", x_max))
    return specs


MATMUL_SPECS = _matmul_specs()
VEC_LENGTHS = [1, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65, 100, 257]


def _spec_id(spec):
    t, group, act_bits, rows, cols, n, wk, xk = spec
    return f"{t}-g{group}-a{act_bits}-{rows}x{cols}-n{n}-w{wk}-x{xk}"


def _case_data(index, spec):
    t, group, act_bits, rows, cols, n, wk, xk = spec
    rng = np.random.default_rng(1000 + index)
    w = _weight(wk, rows, cols, rng)
    wbytes, parts = _encode(t, wk, w, group, rng)
    return np.ascontiguousarray(wbytes, np.uint8), parts, _acts(xk, n, cols, rng, parts.get("hot"))


def _vec_data(length):
    rng = np.random.default_rng(5000 + length)
    return rng.standard_normal((3, length)).astype(np.float32), np.float32(rng.standard_normal())


def _write_cases(path, matmul, vecs):
    with open(path, "wb") as f:
        f.write(b"QRZK" + struct.pack("<III", 1, len(matmul) + len(vecs), 0))
        for spec, (wbytes, _, x) in matmul:
            t, group, act_bits, rows, cols, n = spec[:6]
            f.write(struct.pack("<iiiiqqqQ", 0, TYPE_IDS[t], group, act_bits, rows, cols, n, wbytes.nbytes))
            f.write(wbytes.tobytes())
            f.write(np.ascontiguousarray(x, "<f4").tobytes())
        for x, alpha in vecs:
            f.write(struct.pack("<iiiiqqqQ", 1, 0, 0, 0, 0, x.shape[1], 3, 4))
            f.write(struct.pack("<f", alpha))
            f.write(np.ascontiguousarray(x, "<f4").tobytes())


def _read_results(path, matmul, vecs):
    raw = open(path, "rb").read()
    assert raw[:4] == b"QRZO", "not a kernel_check output"
    n_cases, isa_default, sdot, neon_ok = struct.unpack_from("<Iiii", raw, 4)
    assert n_cases == len(matmul) + len(vecs)
    off = 20
    out = {"isa_default": isa_default, "sdot": sdot, "neon_supported": neon_ok, "matmul": [], "vec": []}

    def floats(count):
        nonlocal off
        a = np.frombuffer(raw, "<f4", count, off).copy()
        off += 4 * count
        return a

    for spec, _ in matmul:
        status = struct.unpack_from("<iiii", raw, off)
        off += 16
        rows, n = spec[3], spec[5]
        ys, yn, yp = (floats(n * rows).reshape(n, rows) for _ in range(3))
        out["matmul"].append({"status": status, "scalar": ys, "neon": yn, "split": yp})
    for x, _ in vecs:
        status = struct.unpack_from("<iiii", raw, off)
        off += 16
        dots = floats(2)
        out["vec"].append({"status": status, "dot": dots, "axpy_scalar": floats(x.shape[1]),
                           "axpy_neon": floats(x.shape[1])})
    assert off == len(raw), "trailing bytes in kernel_check output"
    return out


def _run(exe, runner, cpu, case_file, out_file, env=None):
    cmd = runner + (["-cpu", cpu] if runner else []) + [exe, case_file, out_file]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="module")
def neon_run(tmp_path_factory):
    exe, runner = _build_driver()
    work = tmp_path_factory.mktemp("neon")
    matmul = [(spec, _case_data(i, spec)) for i, spec in enumerate(MATMUL_SPECS)]
    vecs = [_vec_data(n) for n in VEC_LENGTHS]
    case_file = str(work / "cases.bin")
    _write_cases(case_file, matmul, vecs)
    results, logs = {}, {}
    for cpu, _ in CPUS:
        out_file = str(work / f"out-{cpu}.bin")
        logs[cpu] = _run(exe, runner, cpu, case_file, out_file)
        results[cpu] = _read_results(out_file, matmul, vecs)
    # the same driver with QRZ_FORCE_GENERIC=1 and no cases: only the ISA it reports
    empty = str(work / "empty.bin")
    _write_cases(empty, [], [])
    generic = _run(exe, runner, CPUS[0][0], empty, str(work / "out-generic.bin"),
                   env={**os.environ, "QRZ_FORCE_GENERIC": "1"})
    return {"matmul": matmul, "vecs": vecs, "results": results, "logs": logs,
            "generic": _read_results(str(work / "out-generic.bin"), [], []), "generic_log": generic}


CPU_IDS = [c for c, _ in CPUS]


@pytest.mark.parametrize("cpu,sdot", CPUS, ids=CPU_IDS)
def test_neon_is_the_default_and_dotprod_detected(neon_run, cpu, sdot):
    res = neon_run["results"][cpu]
    assert res["neon_supported"] == 1 and res["isa_default"] == ISA_NEON, neon_run["logs"][cpu]
    if sdot is not None:
        assert res["sdot"] == sdot, f"qemu -cpu {cpu}: expected the {'SDOT' if sdot else 'plain NEON'} kernels"
    assert neon_run["generic"]["isa_default"] == ISA_SCALAR, neon_run["generic_log"]


@pytest.mark.parametrize("cpu", CPU_IDS)
@pytest.mark.parametrize("index", range(len(MATMUL_SPECS)), ids=[_spec_id(s) for s in MATMUL_SPECS])
def test_neon_matmul(neon_run, cpu, index):
    spec, (_, parts, x) = neon_run["matmul"][index]
    t, group, act_bits = spec[:3]
    got = neon_run["results"][cpu]["matmul"][index]
    assert got["status"][:2] == (0, 0), f"kernel status scalar={got['status'][0]} neon={got['status'][1]}"
    assert got["status"][2] == 1, "no NEON kernel registered for this type/path: the scalar one ran"
    scalar, neon, split = got["scalar"], got["neon"], got["split"]
    assert np.all(np.isfinite(scalar)) and np.all(np.isfinite(neon)), "non-finite or unwritten outputs"
    # a matmul split into row slices (as threads run it) computes every output exactly as the whole one
    np.testing.assert_array_equal(split.view(np.uint32), neon.view(np.uint32))
    want, bound, exact = reference(t, group, act_bits, parts, x)
    if exact is not None:   # SDR, FP4: numpy, scalar and NEON agree bit for bit
        np.testing.assert_array_equal(scalar.view(np.uint32), exact.view(np.uint32), err_msg="scalar vs numpy")
        np.testing.assert_array_equal(neon.view(np.uint32), scalar.view(np.uint32), err_msg="NEON vs scalar")
        if t == "sdr":
            return
    for name, y in (("scalar", scalar), ("neon", neon)):
        err = np.abs(y.astype(np.float64) - want)
        assert np.all(err <= bound), f"{name} vs numpy: worst error / bound {float(np.max(err / bound)):.3g}"
    if t in ("q8", "int4", "fp4", "sq"):   # the same integer sums and the same float ops, in the same order
        np.testing.assert_array_equal(neon.view(np.uint32), scalar.view(np.uint32), err_msg="NEON vs scalar")
    else:
        assert np.all(np.abs(neon.astype(np.float64) - scalar) <= 2 * bound)


@pytest.mark.parametrize("cpu", CPU_IDS)
@pytest.mark.parametrize("index", range(len(VEC_LENGTHS)), ids=[f"n{n}" for n in VEC_LENGTHS])
def test_neon_vector_ops(neon_run, cpu, index):
    x, alpha = neon_run["vecs"][index]
    got = neon_run["results"][cpu]["vec"][index]
    assert got["status"][2] == 1, "no NEON dot/axpy registered"
    a, b, y = x.astype(np.float64)
    bound = 1e-6 * np.abs(a * b).sum() + 1e-30
    for d in got["dot"]:
        assert abs(float(d) - float(a @ b)) <= bound
    want = y + float(alpha) * a
    ybound = 1e-6 * (np.abs(y) + abs(float(alpha)) * np.abs(a)) + 1e-30
    for name in ("axpy_scalar", "axpy_neon"):
        assert np.all(np.abs(got[name] - want) <= ybound), name
