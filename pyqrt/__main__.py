"""Command line: `python -m pyqrt run|chat|inspect model.qrz`.

run      one prompt, streamed to stdout
chat     a streaming REPL that keeps the conversation (and its KV cache) between turns
inspect  metadata and tensors of a .qrz
"""
import argparse
import sys

from .errors import QrzError


def _add_model_args(p):
    p.add_argument("model", help="path to a .qrz file")
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: physical cores)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length (default: the model's)")


def _add_sampling_args(p, max_tokens):
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", "--temp", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling(args):
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def cmd_run(args):
    from . import load
    model = load(args.model, threads=args.threads, ctx=args.ctx)
    for piece in model.generate(args.prompt, stream=True, ignore_eos=args.ignore_eos, **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    t = model.last_timings
    if args.verbose and t:
        print(f"[prompt {t['n_prompt']} tokens in {t['prompt_ms']:.0f} ms; generated {t['n_generated']} tokens "
              f"at {t['n_generated'] / max(t['gen_ms'], 1e-9) * 1e3:.1f} tok/s; finish: {t['finish']}]",
              file=sys.stderr)


def cmd_chat(args):
    from . import load
    model = load(args.model, threads=args.threads, ctx=args.ctx)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("pyqrt chat - empty line or /exit to quit, /reset to forget the conversation", file=sys.stderr)
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() in ("", "/exit", "/quit"):
            if line.strip() == "" and not interactive:
                continue
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            model.reset()
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in model.chat(messages, stream=True, **_sampling(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _summarize(value):
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:5])
        return f"[{head}{', ...' if len(value) > 5 else ''}] ({len(value)} items)"
    if isinstance(value, str) and (len(value) > 120 or "\n" in value):
        return repr(value[:100]) + f"... ({len(value)} chars)"
    return repr(value)


def cmd_inspect(args):
    from . import open_file
    f = open_file(args.model, verify=not args.no_verify)
    print(f"{f.path}: .qrz version {f.version}, {f.file_size:,} bytes, {len(f.metadata)} keys, "
          f"{len(f.tensors)} tensors")
    for key, value in f.metadata.items():
        print(f"  {key} = {_summarize(value)}")
    if not args.no_tensors:
        print("tensors:")
        for t in f.tensors:
            shape = "x".join(str(d) for d in t["shape"])
            group = f" group={t['group_size']}" if t["group_size"] else ""
            print(f"  {t['name']:<48} {t['type']:<4} {shape:<14}{group} {t['nbytes']:>12,} B @ {t['offset']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pyqrt", description="pyqrt: 4-bit LLM inference on the CPU")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="generate a continuation of a prompt")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    _add_sampling_args(p, 256)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model_args(p)
    p.add_argument("-s", "--system", default=None, help="system prompt")
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("inspect", help="print a .qrz file's metadata and tensors")
    p.add_argument("model")
    p.add_argument("--no-tensors", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the tensor checksums")
    p.set_defaults(func=cmd_inspect)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (QrzError, OSError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
