"""Hugging Face model directory (or a llama.cpp GGUF file) -> one .qrz file.

    python -m convert HF_DIR|MODEL.gguf OUT.qrz --format f32|f16|q8|sdr|int4|fp4 [--group-size 32]

Streams tensor by tensor (peak memory is about the largest tensor, not the model) and writes under a temporary
name, renamed into place only when complete: a failed or interrupted run leaves no .qrz behind.
"""
import contextlib
import copy
import os
import sys

from .errors import ConvertError
from .formats import FORMATS, FOUR_BIT_FALLBACK, Calibration
from .formats import f32 as f32_format
from .architectures import architecture, model_metadata, tensor_names, transform
from .hf import TensorSource, check_dtype, read_config
from .qrzfile import ARRAY, F32, I32, KV, QrzWriter, TensorSpec
from .tokenizer import tokenizer_metadata

__all__ = ["convert", "ConvertError", "FORMATS"]

GGUF_MAGIC = b"GGUF"
# calibration tokens after the --calib-tokens ones, held out to choose between a format's roundings (sq's error
# feedback or not) by the whole model's perplexity; fewer than HELD_OUT_MIN of them and the first rounding is kept
HELD_OUT_TOKENS = 4096
HELD_OUT_MIN = 256


def _is_gguf(path):
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _progress(items, enabled, desc):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="tensor")


def _plain_progress(items, desc):
    step = max(1, len(items) // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == len(items):
            print(f"{desc}: {i}/{len(items)} tensors", file=sys.stderr, flush=True)


def _sparse_args(module, group, sparse):
    """(nbytes extra args, quantize keyword args) of a format with a sparse fraction (sq); empty for the others"""
    if not hasattr(module, "DEFAULT_SPARSE"):
        return (), {}
    return (module.slots_for(group, sparse),), {"sparse": sparse}


def _matrix_format(fmt_module, name, rows, cols, group, sparse=None):
    """The format a matrix is stored in: the requested one, except that the 4-bit formats keep the embedding and
    the output head, and any matrix whose shape they cannot hold, in FOUR_BIT_FALLBACK (docs/FORMAT.md)."""
    if not getattr(fmt_module, "ACTS_4BIT", False):
        return fmt_module, (group if fmt_module.QUANTIZED else 0)
    fallback = FORMATS[FOUR_BIT_FALLBACK]
    fallback_group = fallback.DEFAULT_GROUP if cols % fallback.DEFAULT_GROUP == 0 else group
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return fallback, fallback_group
    try:
        fmt_module.nbytes(rows, cols, group, *_sparse_args(fmt_module, group, sparse)[0])
    except ValueError:
        return fallback, fallback_group
    return fmt_module, group


@contextlib.contextmanager
def _float_model(hf_dir, out_path, progress):
    """the model converted to a temporary f16 .qrz beside the output and loaded (the calibration runs it or its
    tokenizer); the file is removed afterwards, however the block is left"""
    import tempfile

    import pyqrt
    fd, tmp = tempfile.mkstemp(suffix=".f16.qrz", dir=os.path.dirname(os.path.abspath(out_path)))
    os.close(fd)
    try:
        convert(hf_dir, tmp, fmt="f16", progress=progress)
        model = pyqrt.load(tmp, ctx=512)
        yield model
        del model
    finally:
        os.unlink(tmp)


def _calibration_ids(model, calib, calib_tokens, progress, held_out=0):
    """(the first calib_tokens tokens of the calibration text, up to held_out tokens after them)"""
    try:
        with open(calib, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"cannot read the calibration text '{calib}': {exc}; give a UTF-8 text file")
    all_ids = model.tokenize(text, special=False)
    ids = all_ids[:calib_tokens]
    if len(ids) < 64:
        raise ConvertError(f"the calibration text '{calib}' has only {len(ids)} tokens; give at least a few "
                           f"thousand")
    if progress:
        print(f"calibrating on {len(ids)} tokens of {os.path.basename(calib)}", file=sys.stderr, flush=True)
    return ids, all_ids[calib_tokens:calib_tokens + held_out]


def _statistics(model, ids, samples):
    """{tensor name: Calibration} of every matmul's input while the float model reads ids: mean x x^T, and with
    samples > 0 also max |x| per column and `samples` input rows"""
    stats = model.input_statistics(ids, window=512, gram=True, samples=samples)
    return {name: Calibration(*s) if samples else Calibration(gram=s) for name, s in stats.items()}


def _calibrate(hf_dir, out_path, calib, calib_tokens, progress, samples=0, held_out=0):
    """(_statistics of the model (converted to a temporary f16 .qrz beside the output, then removed) on
    `calib_tokens` tokens of the calibration text, up to `held_out` tokens that follow them)"""
    with _float_model(hf_dir, out_path, progress) as model:
        ids, rest = _calibration_ids(model, calib, calib_tokens, progress, held_out=held_out)
        return _statistics(model, ids, samples), rest


def _untuned(module, w, group, calib, sparse, roundings):
    """{rounding: the matrix's bytes} as the format writes it without --signround, in each of roundings (the
    format's ROUNDINGS, or ("untuned",) for a format with one rounding)"""
    if hasattr(module, "ROUNDINGS"):
        return module.quantize_roundings(w, group, calib=calib, sparse=sparse, roundings=roundings)
    kw = _sparse_args(module, group, sparse)[1]
    if calib is not None and getattr(module, "CALIBRATED", False):
        return {roundings[0]: module.quantize(w, group, calib=calib, **kw)}
    return {roundings[0]: module.quantize(w, group, **kw)}


def _keep_best_by_held_out(paths, held_out, out_path, progress):
    """paths {rounding: a complete candidate file}: score each on the held-out calibration tokens (perplexity,
    default activations, windows of 512) and move the best (ties to the first) to out_path -> {rounding: ppl}"""
    import pyqrt
    scores = {}
    for rounding, path in paths.items():
        model = pyqrt.load(path, ctx=512)
        scores[rounding] = model.perplexity(held_out, window=512)
        del model
        if progress:
            print(f"rounding '{rounding}': perplexity {scores[rounding]:.3f} on {len(held_out)} held-out "
                  f"calibration tokens", file=sys.stderr, flush=True)
    best = min(scores, key=lambda r: (scores[r], list(paths).index(r)))
    os.replace(paths[best], out_path)
    if progress:
        print(f"kept rounding '{best}'", file=sys.stderr, flush=True)
    return scores


def convert(hf_dir, out_path, fmt="f16", group_size=None, progress=True, calib=None, calib_tokens=16384,
            sparse=None, signround=False, iters=None, samples=None, seqlen=None):
    """Convert a Hugging Face model directory, or a GGUF file, into a .qrz. Returns the output path.
    group_size None: the format's default (docs/QUANTIZATION.md says how each was chosen). calib: a UTF-8 text
    file; formats that can use it (sdr, fp4, sq) then round each matrix against the inputs it meets on that text, so
    the error of its output, not of its weights, is kept small (never give the evaluation text); sq writes one
    candidate per rounding and keeps the one with the lower perplexity on up to HELD_OUT_TOKENS tokens after
    them. sparse: sq's
    high-precision fraction (default sq.DEFAULT_SPARSE); an error for the other formats. signround: learn each
    block's rounding and clipping on the calib text (convert/signround.py; needs torch), iters steps per block on
    samples sequences of seqlen tokens (defaults there)."""
    hf_dir, out_path = os.fspath(hf_dir), os.fspath(out_path)
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ConvertError(f"cannot write into '{out_dir}': it does not exist or is not writable")
    fmt_module = FORMATS[fmt]
    if sparse is not None and not hasattr(fmt_module, "DEFAULT_SPARSE"):
        raise ConvertError(f"--sparse is a parameter of --format sq, not of {fmt}")
    if hasattr(fmt_module, "DEFAULT_SPARSE"):
        sparse = fmt_module.DEFAULT_SPARSE if sparse is None else sparse
        if not (isinstance(sparse, (int, float)) and 0 <= sparse < 0.5):
            raise ConvertError(f"--sparse must be a fraction in [0, 0.5), got {sparse!r}")
    if group_size is None:
        group_size = getattr(fmt_module, "DEFAULT_GROUP", 0)
    if fmt_module.QUANTIZED and (not isinstance(group_size, int) or group_size <= 0):
        raise ConvertError(f"group size must be a positive integer, got {group_size!r}")
    max_group = getattr(fmt_module, "MAX_GROUP", None)
    multiple = getattr(fmt_module, "GROUP_MULTIPLE", 16)
    if max_group and (group_size % multiple or group_size > max_group):
        # checked here: a 4-bit format would otherwise quietly store every matrix in its q8 fallback
        raise ConvertError(f"--format {fmt} needs a group size that is a multiple of {multiple} and at most "
                           f"{max_group}, got {group_size}")

    calibration, signround_ids, held_out, signround_bos = {}, None, [], None
    if (iters is not None or samples is not None or seqlen is not None) and not signround:
        raise ConvertError("--iters, --samples and --seqlen are SignRound's; add --signround")
    if signround:
        from . import signround as sr
        if fmt not in sr.FORMATS:
            raise ConvertError(f"--signround tunes the 4-bit formats {', '.join(sr.FORMATS)}, not {fmt}")
        if calib is None:
            raise ConvertError("--signround learns from calibration text: give --calib TEXT_FILE (e.g. c4.utf8 or "
                               "code.utf8 from exllamav2's calibration set; never the text you evaluate on)")
        iters = sr.DEFAULT_ITERS if iters is None else iters
        samples = sr.DEFAULT_SAMPLES if samples is None else samples
        seqlen = sr.DEFAULT_SEQLEN if seqlen is None else seqlen
        for key, value in (("iters", iters), ("samples", samples), ("seqlen", seqlen)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if key == "seqlen" else 1):
                raise ConvertError(f"--{key} must be a positive integer, got {value!r}")
        sr.import_torch()   # a missing torch fails before any work
        # SignRound tunes on samples x seqlen tokens; each matrix starts where --calib alone would leave it (its
        # statistics from the first calib_tokens of them), and the HELD_OUT_TOKENS after them choose between the
        # tuned model and the untuned one
        with _float_model(hf_dir, out_path, progress) as model:
            signround_ids, held_out = _calibration_ids(model, calib, samples * seqlen, progress,
                                                       held_out=HELD_OUT_TOKENS)
            signround_bos = model.scoring_bos   # each tuning sequence behind BOS, as the model reads text
            if getattr(fmt_module, "CALIBRATED", False):
                calibration = _statistics(model, signround_ids[:calib_tokens], getattr(fmt_module, "SAMPLE_ROWS", 0))
    elif calib is not None and getattr(fmt_module, "CALIBRATED", False):
        calibration, held_out = _calibrate(hf_dir, out_path, calib, calib_tokens, progress,
                                           samples=getattr(fmt_module, "SAMPLE_ROWS", 0),
                                           held_out=HELD_OUT_TOKENS if hasattr(fmt_module, "ROUNDINGS") else 0)

    if _is_gguf(hf_dir):
        from .gguf import GGUFModel   # reads through the `gguf` package, imported only for GGUF input
        gguf_model = GGUFModel(hf_dir)
        config, source, tokenizer_meta = gguf_model.config, gguf_model.source, gguf_model.tokenizer_metadata
    else:
        if not os.path.isdir(hf_dir):
            raise ConvertError(f"'{hf_dir}' is not a directory (nor a GGUF file); give a Hugging Face model directory "
                               f"or a .gguf file")
        config = read_config(hf_dir)
        architecture(config)   # an unsupported model fails before any tensor file is opened
        source = TensorSource(hf_dir)
        tokenizer_meta = lambda: tokenizer_metadata(hf_dir, config)   # noqa: E731
    try:
        arch = architecture(config)
        meta = {"general.architecture": arch,
                "general.name": str(config.get("_name_or_path") or config.get("_model_name_or_path")
                                    or os.path.splitext(os.path.basename(os.path.abspath(hf_dir)))[0]),
                "general.source": os.path.basename(os.path.abspath(hf_dir)),
                "quant.format": fmt,
                "quant.group_size": group_size if fmt_module.QUANTIZED else 0}
        if sparse is not None:
            meta["quant.sparse"] = float(sparse)
        if calibration:
            meta["quant.calibration"] = f"{os.path.basename(calib)}, {calib_tokens} tokens"
        if signround_ids is not None:
            n_seq = len(signround_ids) // seqlen
            n_held = int(n_seq * sr.HELD_OUT_SHARE)
            meta["quant.signround"] = (f"{iters} iterations per block on {n_seq - n_held} x {seqlen} tokens of "
                                       f"{os.path.basename(calib)}{' behind BOS' if signround_bos is not None else ''}"
                                       f", the step kept chosen on {n_held} more")
        n_vocab = source.shape("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in source.where \
            else config.get("vocab_size")
        meta.update(model_metadata(arch, config, n_vocab))
        tied = "lm_head.weight" not in source.where or bool(config.get("tie_word_embeddings", False))
        meta["model.tie_embeddings"] = tied
        meta.update(tokenizer_meta())
        names = tensor_names(arch, meta["model.n_layers"], tied, set(source.where))

        specs, plans = [], []
        for name in names:
            if name not in source.where:
                raise ConvertError(f"tensor '{name}' is missing from the safetensors files of '{hf_dir}'")
            check_dtype(name, source.dtype(name), source.where[name].path)
            shape = source.shape(name)
            if len(shape) == 2:
                rows, cols = shape
                if fmt_module.QUANTIZED and cols % group_size:
                    raise ConvertError(f"group size {group_size} does not divide in_features {cols} of tensor "
                                       f"'{name}'; choose a group size dividing it")
                module, group = _matrix_format(fmt_module, name, rows, cols, group_size, sparse)
                extra = _sparse_args(module, group, sparse)[0]
                specs.append(TensorSpec(name, module.TYPE_ID, shape, group, module.nbytes(rows, cols, group, *extra)))
                plans.append((name, module, group))
            elif len(shape) == 1:
                specs.append(TensorSpec(name, f32_format.TYPE_ID, shape, 0, shape[0] * 4))
                plans.append((name, None, 0))
            else:
                raise ConvertError(f"tensor '{name}' has shape {shape}; expected a matrix or a vector")

        tuned = {}
        if signround_ids is not None:
            def load(name):
                return transform(arch, name, source.load(name)).astype("float32") if name in source.where else None
            tuned, reports = sr.tune(fmt, meta, arch, load, group_size, signround_ids, iters=iters, seqlen=seqlen,
                                     sparse=sparse, progress=progress, calibration=calibration, bos=signround_bos)
            # each block's loss (channel_weighted_loss of its output on the held-out sequences) at the start and at
            # the step kept (0: the start)
            meta["quant.signround_first_loss"] = KV(ARRAY, [r["first_loss"] for r in reports], F32)
            meta["quant.signround_best_loss"] = KV(ARRAY, [r["best_loss"] for r in reports], F32)
            meta["quant.signround_kept_step"] = KV(ARRAY, [int(r["kept"]) for r in reports], I32)
        # a format with several roundings (sq) writes one candidate file per rounding when there is held-out
        # calibration text to choose by; otherwise the first rounding straight into out_path
        # (with --signround: the tuned model, and the untuned one in each of the format's roundings)
        untuned = getattr(fmt_module, "ROUNDINGS", ("untuned",))
        roundings = getattr(fmt_module, "ROUNDINGS", ())[:1]
        if tuned:
            roundings = ("signround",) + (untuned if len(held_out) >= HELD_OUT_MIN else ())
        elif calibration and len(held_out) >= HELD_OUT_MIN:
            roundings = fmt_module.ROUNDINGS
        if len(roundings) > 1:
            meta["quant.rounding_choice"] = (f"of {', '.join(roundings)}, the lower perplexity on {len(held_out)} "
                                             f"held-out tokens of {os.path.basename(calib)}")
        paths = {r: f"{out_path}.{r}-{os.getpid()}" for r in roundings} if len(roundings) > 1 else \
            {r: out_path for r in roundings or (None,)}
        try:
            with contextlib.ExitStack() as stack:
                # each writer its own specs: QrzWriter records every tensor's CRC in them
                writers = {r: stack.enter_context(QrzWriter(
                    path, {**meta, "quant.rounding": r} if (calibration or tuned) and r else meta,
                    copy.deepcopy(specs))) for r, path in paths.items()}
                for name, module, group in _progress(plans, progress, f"{fmt} {os.path.basename(out_path)}"):
                    w = transform(arch, name, source.load(name))
                    if module is None:
                        data = f32_format.quantize(w)
                    elif name in tuned and module is fmt_module:
                        data = {"signround": tuned.pop(name)}
                        if len(roundings) > 1:
                            data.update(_untuned(module, w, group, calibration.pop(name, None), sparse, untuned))
                    elif name in calibration and module is fmt_module and roundings:
                        data = _untuned(module, w, group, calibration.pop(name), sparse,
                                        [r for r in roundings if r != "signround"] or untuned[:1])
                        data.setdefault("signround", data[untuned[0]])
                    elif name in calibration and getattr(module, "CALIBRATED", False):
                        data = module.quantize(w, group, calib=calibration.pop(name),
                                               **_sparse_args(module, group, sparse)[1])
                    else:
                        data = module.quantize(w, group, **_sparse_args(module, group, sparse)[1])
                    for r, writer in writers.items():
                        writer.write_tensor(name, data[r] if isinstance(data, dict) else data)
                    del w, data
            if len(paths) > 1:
                _keep_best_by_held_out(paths, held_out, out_path, progress)
        except OSError as exc:
            raise ConvertError(f"writing '{out_path}' failed: {exc}")
        finally:
            for path in paths.values():
                if path != out_path and os.path.exists(path):
                    os.unlink(path)
    finally:
        source.close()
    return out_path
