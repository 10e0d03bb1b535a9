"""SignRound (Cheng et al., arXiv 2309.05516; docs/QUANTIZATION.md): rounding and clipping learned per transformer
block, for every 4-bit format.

For each block in model order, every matrix's quantizer gets a rounding offset V per weight (code =
round(w / step + V)) and a clipping factor alpha per group (the group's scale follows alpha * its absmax). Both
start where the format's own data-free search ends. V moves by signed gradient descent (SignSGD: a step of lr
times the sign of the gradient, lr = 1/iters decaying linearly to 0, so V stays within about [-0.5, 0.5] and can
flip any weight's rounding by one level at most) to make the block's output on calibration text, its inputs those
of the already-quantized earlier blocks, match the output of the float block on float inputs. alpha moves too only
where a Rounder sets TUNE_ALPHA, which only INT4 does (it starts from round to nearest, no search): from a
searched clipping, learning it lost to V alone (see Rounder.TUNE_ALPHA). A share of the sequences
(HELD_OUT_SHARE) is never tuned on: the parameters at the start and at CHECKPOINTS of the way are judged by the
block's loss on those, and the best is kept, so a block is not left worse than the format's own rounding on
sequences it was not tuned on, and a fit to the tuning sequences alone is not kept. Rounding is straight-through
(its gradient taken as 1); a power-of-two scale (SDR's per-group shift) likewise passes alpha's gradient as if
the scale were proportional to alpha.

The block is run here in PyTorch, written from the same model.* metadata the C runtime reads (one graph for
Llama, Qwen2 and Gemma-3, as native/model.c), so the converter needs no transformers. torch is needed at
conversion only, and only for --signround: the `signround` extra (CPU build torch==2.13.0). What comes out is the
format's ordinary bytes; nothing changes at run time.

Activations are not quantized while tuning (SignRound tunes weights); the formats' activation searches (fp4's
layout and offsets, sq's hot channels) then run, as with --calib, on input rows that the tuned, quantized model
met on the calibration text.
"""
import sys
import time

import numpy as np

from .errors import ConvertError
from .formats import Calibration, fp4, int4, nibbles, scales_then_codes, sdr, sq

FORMATS = ("int4", "sdr", "fp4", "sq")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_ITERS, DEFAULT_SAMPLES, DEFAULT_SEQLEN, DEFAULT_BATCH = 100, 128, 256, 4
HELD_OUT_SHARE = 1 / 8        # of the sequences, never tuned on: they choose which snapshot a block keeps
CHECKPOINTS = (0.5, 0.75, 1.0)   # snapshots (besides the start) at these fractions of the iterations
PASS_BATCH = 16               # sequences per forward pass when a whole sample set flows through a block


def import_torch():
    try:
        import torch
    except ImportError:
        raise ConvertError("--signround needs PyTorch for its gradients (at conversion only; the runtime never "
                           "does): pip install 'pyqrt[signround]' (the CPU build torch==2.13.0)") from None
    return torch


# ---- the quantizers, with learnable offsets and clipping ----

class Rounder:
    """one matrix's learnable quantizer: V (rows, ng, group), alpha (rows, ng); fake() is the dequantized weight
    (differentiable in V and alpha), pack(calib) the format's bytes for the current V and alpha"""
    ALPHA_RANGE = (0.5, 1.0)
    # whether alpha is tuned (off: the format keeps the clipping its own data-free search chose, and SignSGD moves
    # V only; INT4, which has no search, starts from round-to-nearest's full range and tunes it). A scale's straight-through gradient, value - w/d against the loss gradient, leans toward shrinking:
    # on the weights' own error it is 2 d (value - w/d)^2 >= 0 for every weight inside the range, and only clipped
    # weights pull back (in FP4's rounder not even those: its nearest-code lookup passes the gradient past the top
    # code; tests/test_signround.py). On one Gemma-3 block (layer 6, 100 steps, error on held-out wiki inputs)
    # tuning alpha too left the error worse than V alone in all four formats, and FP4's alpha alone made it 20x
    # worse (docs/QUANTIZATION.md). INT4 keeps it only because its whole-model result with alpha (41.05 against
    # 114.87 on Gemma-3) is measured and V alone there is not yet.
    TUNE_ALPHA = False

    def __init__(self, torch, w, group, col_energy):
        self.torch, self.group = torch, group
        self.rows, self.cols = w.shape
        self.ng = self.cols // group
        self.w_np = np.ascontiguousarray(w, np.float32)
        self.col_energy = np.maximum(np.asarray(col_energy, np.float32), 0)
        self.w = torch.from_numpy(self.w_np.copy()).reshape(self.rows, self.ng, group)
        self.amax = self.w.abs().amax(dim=2)
        self.V = torch.zeros_like(self.w)
        self.alpha = torch.ones(self.rows, self.ng)

    def params(self):
        return [self.V, self.alpha] if self.TUNE_ALPHA else [self.V]

    def start_at(self, units, step):
        """V such that round(w / step + V) is `units` (rows, cols) (the codes of a calibrated start, in steps):
        the whole number of steps by which each code differs from w / step rounded to nearest. So w / step + V
        keeps the weight's place within its rounding interval, and SignSGD's half a step either way flips the
        weights near an edge, as from a round-to-nearest start (V exactly units - w / step would put every weight
        mid-interval, where half a step flips none)"""
        u = np.asarray(units, np.float64).reshape(self.rows, self.ng, self.group)
        w = self.w_np.astype(np.float64).reshape(self.rows, self.ng, self.group)
        st = np.asarray(step, np.float64).reshape(self.rows, self.ng, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(st > 0, u - np.rint(w / np.where(st > 0, st, 1)), 0)
        self.V = self.torch.from_numpy(v.astype(np.float32))

    def clipped_alpha(self):
        return self.alpha.clamp(*self.ALPHA_RANGE)

    def round_ste(self, x):
        return x + (self.torch.round(x) - x).detach()

    def f16_ste(self, x):
        """x rounded to f16, as the file stores a scale, with the gradient of x"""
        return x + (x.half().float() - x).detach()

    def fake(self):
        raise NotImplementedError

    def pack(self, calib=None):
        raise NotImplementedError


def _safe(d):
    """a scale usable as a divisor: 0 (an all-zero group) becomes 1, whose codes are then 0"""
    return d + (d <= 0).to(d.dtype)


class Int4Rounder(Rounder):
    """INT4: d = alpha * absmax / 7 (f16), q = clamp(round(w / d + V), -8, 7)"""
    TUNE_ALPHA = True

    def _parts(self):
        d = self.f16_ste(self.amax * self.clipped_alpha() / 7.0)
        q = self.round_ste(self.w / _safe(d)[:, :, None] + self.V).clamp(-8, 7)
        return d, q

    def fake(self):
        d, q = self._parts()
        return (q * d[:, :, None]).reshape(self.rows, self.cols)

    def pack(self, calib=None):
        with self.torch.no_grad():
            d, q = self._parts()
        d16 = d.numpy().astype(np.float16)
        m = q.numpy().astype(np.int8).reshape(self.rows, self.cols)
        return scales_then_codes(d16, nibbles.pack(m), int4.nbytes(self.rows, self.cols, self.group))


class SdrRounder(Rounder):
    """SDR: the row scale s of the format's own search stays; each group's shift e follows its clipped maximum
    alpha * max|w| / s in base units as QRazor's rule does (leading one minus 2), and q = clamp(round(w / (s 2^e)
    + V), -8, 7). alpha starts where the search's choice of e (QRazor's or one finer) puts it."""
    ALPHA_RANGE = (0.25, 1.0)

    def __init__(self, torch, w, group, col_energy, calib=None):
        super().__init__(torch, w, group, col_energy)
        if calib is not None and calib.gram is not None:    # the converter's calibrated rounding (error feedback)
            s, e0, m0 = sdr.gptq_parts(self.w_np, group, calib.gram)
            self.e_fixed = torch.from_numpy(e0.astype(np.float32))
        else:
            s, e0, m0 = sdr.quantize_parts(self.w_np, group, col_weight=self.col_energy)
            self.e_fixed = None
        self.s = torch.from_numpy(s.astype(np.float32))
        base = (self.amax / _safe(self.s)[:, None]).numpy().astype(np.float64)   # the group maximum in base units
        qrazor = np.clip(sdr.leading_one(np.rint(np.minimum(base, 127))) - 2, 0, sdr.MAX_SHIFT)
        finer = e0.astype(np.int64) < qrazor
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(finer, (2.0 ** (e0.astype(np.float64) + 3) - 1) / base, 1.0)
        self.alpha = torch.from_numpy(np.nan_to_num(alpha, nan=1.0).astype(np.float32))
        if self.e_fixed is not None:
            self.start_at(m0, s[:, None] * 2.0 ** e0.astype(np.float64))

    def _parts(self):
        torch = self.torch
        if self.e_fixed is not None:    # a calibrated start's shifts stay (alpha is not tuned for SDR)
            step = self.s[:, None] * torch.pow(2.0, self.e_fixed)
            return step, self.e_fixed, self.round_ste(self.w / step[:, :, None] + self.V).clamp(-8, 7)
        a = self.clipped_alpha()
        top = torch.round(torch.clamp(a * self.amax / _safe(self.s)[:, None], max=127.0)).detach()
        _, exponent = torch.frexp(torch.clamp(top, min=1.0))        # top in [2^(x-1), 2^x): leading one x - 1
        e = torch.clamp(exponent - 3, 0, sdr.MAX_SHIFT)
        step = self.s[:, None] * torch.pow(2.0, e.float())
        step = step * a / a.detach()                                # alpha's gradient, as if step ~ alpha
        q = self.round_ste(self.w / step[:, :, None] + self.V).clamp(-8, 7)
        return step, e, q

    def fake(self):
        step, _, q = self._parts()
        return (q * step[:, :, None]).reshape(self.rows, self.cols)

    def pack(self, calib=None):
        with self.torch.no_grad():
            _, e, q = self._parts()
        return sdr.pack(self.s.numpy(), e.numpy().astype(np.uint8),
                        q.numpy().astype(np.int8).reshape(self.rows, self.cols), self.group)


class Fp4Rounder(Rounder):
    """FP4: the layout (E1M2, E2M1, E3M0) of the format's own weighted search stays; d = alpha * absmax / top
    (f16) and each weight's code is the nearest to w / d + V * gap, gap being the codebook's spacing where w / d
    lies, so V moves a weight across one rounding boundary at most whatever the spacing"""

    def __init__(self, torch, w, group, col_energy, calib=None):
        super().__init__(torch, w, group, col_energy)
        if calib is not None and calib.gram is not None:    # the converter's calibrated search (output error)
            self.e, d16, codes = fp4.search_weights(self.w_np, group, calib.gram)
        else:
            best = None
            for e in fp4.EXPONENTS:
                d16, codes = fp4.quantize_weights(self.w_np, group, e, self.col_energy)
                err = float((self.col_energy[None, :] *
                             (fp4.dequantize_weights(d16, codes, group, e) - self.w_np) ** 2).sum())
                if best is None or err < best[0]:
                    best = (err, e, d16)
            _, self.e, d16 = best
            codes = None
        mags = fp4.codebook(self.e).astype(np.float32)
        self.top = float(mags[-1])
        self.mags = torch.from_numpy(mags)
        self.gaps = torch.from_numpy(np.diff(mags))
        self.mids = torch.from_numpy((mags[1:] + mags[:-1]) * np.float32(0.5))
        amax = self.amax.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(amax > 0, d16.astype(np.float32) * self.top / amax, 1.0)
        self.alpha = torch.from_numpy(np.clip(alpha, *self.ALPHA_RANGE).astype(np.float32))
        # the calibrated start's layout and scales stay (alpha is not tuned for FP4); its codes are the nearest
        # (fp4.search_weights), so V starts at 0 as from the data-free search
        self.d_fixed = None if codes is None else torch.from_numpy(d16.astype(np.float32))
        self._fixed = None

    def _units(self):
        """(d, w / d + V * gap) in code units"""
        torch = self.torch
        if self._fixed is not None:
            d, u, gap = self._fixed
            return d, u + self.V * gap
        d = self.d_fixed if self.d_fixed is not None else self.f16_ste(self.amax * self.clipped_alpha() / self.top)
        u = self.w / _safe(d)[:, :, None]
        i = torch.clamp(torch.bucketize(u.abs().detach(), self.mags, right=True) - 1, 0, len(self.gaps) - 1)
        if not self.TUNE_ALPHA:
            # alpha is not learned, so d, w / d and the spacing there never change: kept for every later step (the
            # nearest-code lookup was a tenth of a Gemma-3 conversion's time)
            self._fixed = (d.detach(), u.detach(), self.gaps[i])
        return d, u + self.V * self.gaps[i]

    def fake(self):
        torch = self.torch
        d, u = self._units()
        value = torch.sign(u) * self.mags[torch.bucketize(u.abs().detach(), self.mids)]
        return ((u + (value - u).detach()) * d[:, :, None]).reshape(self.rows, self.cols)

    def pack(self, calib=None):
        with self.torch.no_grad():
            d, u = self._units()
        d16 = d.numpy().astype(np.float16)
        codes = fp4.encode(u.numpy(), self.e).reshape(self.rows, self.cols)
        if calib is None or calib.absmax is None or not np.max(calib.absmax) > 0:
            return fp4.pack(self.e, d16, codes)
        w_hat = fp4.dequantize_weights(d16, codes, self.group, self.e)
        e_a, mode, scale, shifts = fp4.search_acts(w_hat, calib.absmax, calib.samples, self.group)
        return fp4.pack(self.e, d16, codes, e_a, mode, scale, shifts)


class SqRounder(Rounder):
    """SQ: the slot positions of the format's importance rule stay; d = max(alpha * max|dense| / 7,
    max|slot| / SLOT_MAX) (f16), and q = round(w / d + V) clamped to the dense 4-bit range, or to the slots'
    SLOT_MIN..SLOT_MAX at a slot"""

    def __init__(self, torch, w, group, col_energy, sparse=sq.DEFAULT_SPARSE, calib=None):
        super().__init__(torch, w, group, col_energy)
        self.sparse, self.k = sparse, sq.slots_for(group, sparse)
        importance = self.col_energy
        if calib is not None and calib.gram is not None:    # the converter's calibrated importance (diag H)
            importance = np.maximum(np.diag(np.asarray(calib.gram, np.float32)), 0)
        d16, q0, self.pos, v0 = sq.quantize_parts(self.w_np, group, self.k, importance)
        is_slot = np.zeros((self.rows, self.ng, group), bool)
        np.put_along_axis(is_slot, self.pos.astype(np.int64), True, axis=2)
        self.is_slot = torch.from_numpy(is_slot)
        a = self.w.abs()
        self.amax_dense = torch.where(self.is_slot, torch.zeros_like(a), a).amax(dim=2)
        self.amax_slot = torch.where(self.is_slot, a, torch.zeros_like(a)).amax(dim=2)
        dense = self.amax_dense.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(dense > 0, d16.astype(np.float32) * 7 / dense, 1.0)
        self.alpha = torch.from_numpy(np.clip(alpha, *self.ALPHA_RANGE).astype(np.float32))
        self.d_fixed = None
        if calib is not None and calib.gram is not None:   # the calibrated start's scales stay (alpha not tuned)
            self.d_fixed = torch.from_numpy(d16.astype(np.float32))
            units = sq._plus_slots(q0.astype(np.float64).reshape(self.rows, self.ng, group), self.pos, v0)
            self.start_at(units, d16)

    def _parts(self):
        torch = self.torch
        d = self.d_fixed if self.d_fixed is not None else self.f16_ste(
            torch.maximum(self.amax_dense * self.clipped_alpha() / 7.0, self.amax_slot / float(sq.SLOT_MAX)))
        u = self.round_ste(self.w / _safe(d)[:, :, None] + self.V)
        return d, torch.where(self.is_slot, u.clamp(sq.SLOT_MIN, sq.SLOT_MAX), u.clamp(-8, 7))

    def fake(self):
        d, q = self._parts()
        return (q * d[:, :, None]).reshape(self.rows, self.cols)

    def pack(self, calib=None):
        with self.torch.no_grad():
            d, q = self._parts()
        d16 = d.numpy().astype(np.float16)
        u = q.numpy().astype(np.int16)
        dense = np.where(self.is_slot.numpy(), 0, u).astype(np.int8).reshape(self.rows, self.cols)
        vals = np.take_along_axis(u, self.pos.astype(np.int64), axis=2)
        if calib is None or calib.absmax is None or not np.max(calib.absmax) > 0:
            return sq.pack(d16, dense, self.pos, vals)
        w_hat = sq.dequantize_parts(d16, dense, self.pos, vals, self.group)
        acts = sq.search_acts(w_hat, calib.absmax, calib.samples, self.group,
                              sq.hot_base(self.cols))
        return sq.pack(d16, dense, self.pos, vals, *acts)


ROUNDERS = {"int4": Int4Rounder, "sdr": SdrRounder, "fp4": Fp4Rounder, "sq": SqRounder}


# ---- the transformer block, as native/model.c runs it ----

def _value(meta, key, default=None):
    v = meta.get(key, default)
    return getattr(v, "value", v)


class BlockGraph:
    """the forward pass of one decoder block from the .qrz metadata (model.*): RMSNorm, q/k/v (+ biases),
    q/k norms, rotate-half RoPE (the sliding layers' own frequencies), causal attention (windowed on sliding
    layers) with grouped kv heads, o, Gemma's post-norms, the gated MLP"""

    def __init__(self, torch, meta, arch):
        from .architectures import _default_inv_freq
        self.torch, self.gemma = torch, arch == "gemma3"
        self.E, self.heads = _value(meta, "model.n_embd"), _value(meta, "model.n_heads")
        self.kv_heads, self.hd = _value(meta, "model.n_kv_heads"), _value(meta, "model.head_dim")
        self.eps = float(_value(meta, "model.norm_eps"))
        self.gelu = _value(meta, "model.activation") == "gelu_tanh"
        self.attn_scale = float(_value(meta, "model.attn_scale", self.hd ** -0.5))
        self.embed_scale = float(_value(meta, "model.embed_scale", 1.0))
        theta = float(_value(meta, "model.rope_theta"))
        theta_local = float(_value(meta, "model.rope_theta_local", theta))
        full = _value(meta, "model.rope_inv_freq")
        local = _value(meta, "model.rope_inv_freq_local")
        full = np.float32(full) if full is not None else _default_inv_freq(theta, self.hd)
        if local is None:
            local = _default_inv_freq(theta_local, self.hd) if "model.rope_theta_local" in meta else full
        self.inv_freq = (torch.from_numpy(np.float32(full)), torch.from_numpy(np.float32(local)))
        self.window = int(_value(meta, "model.sliding_window", 0) or 0)
        self.sliding = list(_value(meta, "model.sliding_layers", []) or [])
        self._tables = {}

    def _rope_and_mask(self, layer, n):
        sliding = bool(self.window and layer < len(self.sliding) and self.sliding[layer])
        key = (sliding, n)
        if key not in self._tables:
            torch = self.torch
            pos = torch.arange(n, dtype=torch.float32)
            angle = pos[:, None] * self.inv_freq[1 if sliding else 0][None, :]
            i = torch.arange(n)
            mask = i[None, :] <= i[:, None]
            if sliding:
                mask &= i[:, None] - i[None, :] < self.window
            self._tables[key] = (torch.cos(angle), torch.sin(angle), mask)
        return self._tables[key]

    def rmsnorm(self, x, w):
        return x * self.torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + self.eps) * w

    def rope(self, x, cos, sin):
        half = self.hd // 2
        a, b = x[..., :half], x[..., half:]
        return self.torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def forward(self, layer, x, p, weight, seen=None):
        """x (B, n, E); p: the block's float tensors by short name (norms, biases); weight(name) -> the matrix to
        use for a linear; seen(name, input): called with each linear's input (calibration statistics)"""
        torch = self.torch
        F = torch.nn.functional
        B, n, _ = x.shape
        cos, sin, mask = self._rope_and_mask(layer, n)

        def linear(name, h):
            if seen is not None:
                seen(name, h)
            y = h @ weight(name).T
            bias = p.get(name + ".bias")
            return y if bias is None else y + bias

        h = self.rmsnorm(x, p["input_layernorm.weight"])
        q = linear("self_attn.q_proj", h).view(B, n, self.heads, self.hd)
        k = linear("self_attn.k_proj", h).view(B, n, self.kv_heads, self.hd)
        v = linear("self_attn.v_proj", h).view(B, n, self.kv_heads, self.hd)
        if self.gemma:
            q = self.rmsnorm(q, p["self_attn.q_norm.weight"])
            k = self.rmsnorm(k, p["self_attn.k_norm.weight"])
        q, k = self.rope(q, cos[:, None, :], sin[:, None, :]), self.rope(k, cos[:, None, :], sin[:, None, :])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.attn_scale)
        o = linear("self_attn.o_proj", att.transpose(1, 2).reshape(B, n, self.heads * self.hd))
        if self.gemma:
            o = self.rmsnorm(o, p["post_attention_layernorm.weight"])
            h = self.rmsnorm(x + o, p["pre_feedforward_layernorm.weight"])
        else:
            h = self.rmsnorm(x + o, p["post_attention_layernorm.weight"])
        x = x + o
        g, u = linear("mlp.gate_proj", h), linear("mlp.up_proj", h)
        act = F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)
        y = linear("mlp.down_proj", act * u)
        if self.gemma:
            y = self.rmsnorm(y, p["post_feedforward_layernorm.weight"])
        return x + y


class _InputStats:
    """per linear: mean x^2 and max |x| per input column, and up to `rows` input rows drawn at random"""

    def __init__(self, rows, rng):
        self.rows, self.rng = rows, rng
        self.energy, self.count, self.absmax, self.picked = {}, {}, {}, {}

    def __call__(self, name, h):
        x = h.detach().reshape(-1, h.shape[-1]).numpy()
        self.energy[name] = self.energy.get(name, 0) + (x.astype(np.float64) ** 2).sum(axis=0)
        self.count[name] = self.count.get(name, 0) + x.shape[0]
        self.absmax[name] = np.maximum(self.absmax.get(name, 0), np.abs(x).max(axis=0))
        if self.rows:
            take = self.rng.choice(x.shape[0], size=min(self.rows, x.shape[0]), replace=False)
            self.picked.setdefault(name, []).append(x[take])

    def mean_energy(self, name):
        return (self.energy[name] / max(self.count[name], 1)).astype(np.float32)

    def calibration(self, name):
        """a Calibration of absmax and `rows` rows drawn uniformly from all the batches' picks"""
        if not self.rows:
            return None
        pool = np.concatenate(self.picked[name])
        take = self.rng.choice(pool.shape[0], size=min(self.rows, pool.shape[0]), replace=False)
        return Calibration(absmax=self.absmax[name].astype(np.float32), samples=pool[take])


def channel_weighted_loss(target):
    """the block loss: the squared error of each output channel weighed by the inverse of its mean square in
    target (N, n, E), the float block's output on the tuning sequences. Gemma-3's residual stream has a few massive
    channels (one holds 40-95% of the sum of squares in every block), and a plain mean squared error would tune the
    block to those alone."""
    energy = (target ** 2).mean(dim=(0, 1))
    weight = 1.0 / (energy + 1e-6 * float(energy.mean()) + 1e-30)
    return lambda y, want: ((y - want) ** 2 * weight).mean()


def _through(torch, graph, layer, x, p, weight, seen=None):
    """x (N, n, E) through one block in batches of PASS_BATCH sequences, no gradients"""
    out = torch.empty_like(x)
    with torch.no_grad():
        for b in range(0, x.shape[0], PASS_BATCH):
            out[b:b + PASS_BATCH] = graph.forward(layer, x[b:b + PASS_BATCH], p, weight, seen)
    return out


def tune(fmt, meta, arch, load, group, ids, iters=DEFAULT_ITERS, seqlen=DEFAULT_SEQLEN, batch=DEFAULT_BATCH,
         sparse=None, progress=True, seed=0, calibration=None, bos=None):
    """SignRound over every block -> ({matrix name: its bytes}, [per-block report dicts]). calibration: {matrix
    name: Calibration} of the float model (the converter's --calib statistics): each matrix in it starts at its
    format's calibrated rounding (what --calib alone writes); without it (None, or INT4), at the format's data-free
    search.
    load(name) -> float32 numpy tensor as the runtime wants it (architectures.transform applied), None when the
    model has no such tensor (a bias); ids: the calibration token ids, cut into len(ids) // seqlen sequences of
    seqlen, each behind the token bos when given (a model whose tokenizer starts every text with BOS, as
    Model.scoring_windows reads text: without it Gemma-3's float model is off its distribution for the first few
    dozen tokens, and the tuning would fit those)."""
    torch = import_torch()
    if fmt not in ROUNDERS:
        raise ConvertError(f"--signround tunes the 4-bit formats {', '.join(FORMATS)}, not {fmt}")
    if iters < 1 or batch < 1 or seqlen < 2:
        raise ConvertError(f"--iters, --samples and --seqlen must be positive (got iters={iters}, seqlen={seqlen})")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_seq = len(ids) // seqlen
    if n_seq < 1:
        raise ConvertError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seqlen}; "
                           f"give a longer text or a smaller --seqlen")
    ids = np.asarray(ids[:n_seq * seqlen], np.int64).reshape(n_seq, seqlen)
    if bos is not None:
        ids = np.concatenate([np.full((n_seq, 1), bos, np.int64), ids], axis=1)
    n_train = n_seq - int(n_seq * HELD_OUT_SHARE)     # the last sequences held out (none below 8 sequences)
    graph = BlockGraph(torch, meta, arch)
    embed = load("model.embed_tokens.weight")
    x_float = torch.from_numpy(embed[ids].astype(np.float32) * np.float32(graph.embed_scale))
    del embed
    x_quant = x_float.clone()
    rounder_cls = ROUNDERS[fmt]
    extra = {"sparse": sq.DEFAULT_SPARSE if sparse is None else sparse} if fmt == "sq" else {}
    sample_rows = getattr({"fp4": fp4, "sq": sq}.get(fmt), "SAMPLE_ROWS", 0)
    out, reports = {}, []
    n_layers = int(_value(meta, "model.n_layers"))
    for layer in range(n_layers):
        t0 = time.time()
        prefix = f"model.layers.{layer}."
        p = {}
        for short in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                      "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            if arch == "gemma3" or short in ("input_layernorm", "post_attention_layernorm"):
                p[short + ".weight"] = torch.from_numpy(np.float32(load(prefix + short + ".weight")))
        for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            bias = load(prefix + short + ".bias")
            if bias is not None:
                p[short + ".bias"] = torch.from_numpy(np.float32(bias))
        w_float = {s: torch.from_numpy(np.ascontiguousarray(load(prefix + s + ".weight"), np.float32))
                   for s in LINEARS}
        target = _through(torch, graph, layer, x_float, p, w_float.__getitem__)
        block_loss = channel_weighted_loss(target[:n_train])
        energy = _InputStats(0, rng)
        _through(torch, graph, layer, x_quant[:min(n_train, 32)], p, w_float.__getitem__, energy)
        starts = {s: (calibration or {}).get(prefix + s + ".weight") for s in LINEARS}
        rounders = {s: rounder_cls(torch, w_float[s].numpy(), group, energy.mean_energy(s), **extra,
                                   **({"calib": starts[s]} if fmt != "int4" else {}))
                    for s in LINEARS}
        params = [t for r in rounders.values() for t in r.params()]
        for t in params:
            t.requires_grad_(True)
        # Snapshots of the parameters at the start and at CHECKPOINTS of the way; the one kept is the one with the
        # smallest block loss on the held-out sequences (never tuned on), so a block is not left worse on them than
        # where it started. On the sequences it was tuned on, the loss always falls (to a quarter in Gemma-3's
        # early blocks), and much of that fall does not carry over to other sequences.
        marks = {max(1, round(f * iters)) for f in CHECKPOINTS}
        snapshots = {0: [t.detach().clone() for t in params]}
        steps = range(iters)
        bar = None
        if progress:
            try:
                from tqdm import tqdm
                bar = tqdm(steps, desc=f"signround block {layer + 1}/{n_layers}", unit="it", leave=False)
                steps = bar
            except ImportError:
                pass
        for step in steps:
            pick = torch.from_numpy(rng.choice(n_train, size=min(batch, n_train), replace=False))
            y = graph.forward(layer, x_quant[pick], p, lambda s: rounders[s].fake())
            loss = block_loss(y, target[pick])
            for t in params:
                t.grad = None
            loss.backward()
            lr = (1.0 / iters) * (1.0 - step / iters)
            with torch.no_grad():
                for t in params:
                    t -= lr * torch.sign(t.grad)
            if step + 1 in marks:
                snapshots[step + 1] = [t.detach().clone() for t in params]
            if bar is not None:
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}")

        judge = slice(n_train, n_seq) if n_seq > n_train else slice(0, n_seq)

        def judged_loss():
            """the block's loss on the judging sequences with the rounders as they are"""
            w = {s: r.fake() for s, r in rounders.items()}
            y = _through(torch, graph, layer, x_quant[judge], p, w.__getitem__)
            return float(block_loss(y, target[judge]))

        with torch.no_grad():
            losses = {}
            for at, snap in snapshots.items():
                for t, b in zip(params, snap):
                    t.copy_(b)
                losses[at] = judged_loss()
            kept = min(losses, key=lambda at: (losses[at], -at))
            for t, b in zip(params, snapshots[kept]):
                t.copy_(b)
                t.requires_grad_(False)
            first_loss, best_loss = losses[0], losses[kept]
            w_quant = {s: r.fake() for s, r in rounders.items()}
        stats = _InputStats(sample_rows, rng)
        x_quant = _through(torch, graph, layer, x_quant, p, w_quant.__getitem__, stats if sample_rows else None)
        for s, r in rounders.items():
            out[prefix + s + ".weight"] = r.pack(stats.calibration(s) if sample_rows else None)
        x_float = target
        report = {"block": layer, "first_loss": first_loss, "best_loss": best_loss, "kept": kept,
                  "judged_on": "held-out" if n_seq > n_train else "tuned",
                  "output_error": float(((x_quant - x_float) ** 2).mean()), "seconds": time.time() - t0}
        reports.append(report)
        if progress:
            if bar is not None:
                bar.close()
            print(f"signround block {layer + 1}/{n_layers}: {report['judged_on']} loss {first_loss:.4g} -> "
                  f"{best_loss:.4g} (step {kept} of {iters}), "
                  f"output error {report['output_error']:.4g}, {report['seconds']:.0f} s", file=sys.stderr,
                  flush=True)
    return out, reports
