"""python -m convert HF_DIR|MODEL.gguf OUT.qrz --format f32|f16|q8|sdr|int4|fp4|sq [--group-size N] [--sparse S]
                  [--calib TEXT [--signround [--iters N --samples N --seqlen N]]]"""
import argparse
import signal
import sys

from . import ConvertError, FORMATS, convert


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m convert",
                                     description="Convert a Hugging Face model directory or a GGUF file into one .qrz file.")
    parser.add_argument("model_dir", help="Hugging Face model directory (config.json, *.safetensors, tokenizer) or a llama.cpp .gguf file")
    parser.add_argument("out", help="output .qrz path")
    parser.add_argument("--format", default="f16", choices=sorted(FORMATS), help="tensor format (default: f16)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="weights per quantization group along the input dimension (default: the format's, "
                             "16 for sdr, 64 for fp4 and sq, 32 for q8 and int4)")
    parser.add_argument("--calib", metavar="TEXT_FILE",
                        help="UTF-8 calibration text; sdr then rounds each matrix against the inputs it meets on this "
                             "text (error feedback, as GPTQ), fp4 searches its weight and activation layouts, scales "
                             "and channel offsets against them, sq weighs its slots, finds its outlier channels and "
                             "keeps whichever of two roundings scores better on the text after --calib-tokens. Never "
                             "the text you evaluate on")
    parser.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default: 16384)")
    parser.add_argument("--sparse", type=float, default=None,
                        help="sq: the fraction of each group's weights kept at 8 bits (slots); default 3/64, three "
                             "per group of 64 (4.75 bits per weight)")
    parser.add_argument("--signround", action="store_true",
                        help="sdr, fp4, sq, int4: learn each block's rounding and clipping by signed gradient descent "
                             "on the --calib text (SignRound; needs torch: pip install 'pyqrt[signround]')")
    parser.add_argument("--iters", type=int, default=None, help="SignRound steps per block (default: 100)")
    parser.add_argument("--samples", type=int, default=None,
                        help="SignRound calibration sequences, one in eight held out (default: 128)")
    parser.add_argument("--seqlen", type=int, default=None, help="SignRound tokens per sequence (default: 256)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    # SIGTERM (kill, a job scheduler, a CI timeout) exits through Python, so the writer's and the calibration's
    # clean-up runs and no half-written file or temporary model is left behind, as for Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        path = convert(args.model_dir, args.out, fmt=args.format, group_size=args.group_size, calib=args.calib,
                       calib_tokens=args.calib_tokens, sparse=args.sparse,
                       signround=args.signround, iters=args.iters, samples=args.samples, seqlen=args.seqlen,
                       progress=not args.quiet and sys.stderr.isatty())
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
