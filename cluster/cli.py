"""The `relaygpt` command: parse, resolve, call a function.

Heavy libraries are imported inside the commands, so `relaygpt --help` stays fast. Errors a
user can cause (`RelayError`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.errors import RelayError

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaygpt", description="Train, fine-tune, evaluate and chat with GPT models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tok_sub.add_parser("train", help="train a byte-level BPE on text files")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE")
    train.add_argument("--vocab-size", type=_positive_int, required=True, help="full vocabulary, special tokens included")
    train.add_argument("--out", required=True, metavar="DIR")
    train.set_defaults(func=cmd_tokenizer_train)

    export = sub.add_parser("export", help="write a model directory (native or Hugging Face GPT-2)")
    export.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR", help="a native or Hugging Face GPT-2 model directory")
    export.add_argument("--out", required=True, metavar="DIR")
    export.add_argument("--format", choices=("native", "hf"), default="native")
    export.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="generate completions for a JSONL file of prompts")
    gen.add_argument("model_dir", metavar="MODEL_DIR")
    gen.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    gen.add_argument("--out", required=True, metavar="FILE.jsonl")
    gen.add_argument("--chat", action="store_true", help="render prompts with the chat template, stop at end of turn")
    gen.add_argument("--batch-size", type=_positive_int, default=8)
    _add_sampling(gen, temperature=0.0)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model_dir", metavar="MODEL_DIR")
    chat.add_argument("--system", default=None, metavar="TEXT")
    _add_sampling(chat, temperature=0.7)
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RelayError as exc:
        print(f"relaygpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("relaygpt: interrupted", file=sys.stderr)
        return 130


# ---- commands -----------------------------------------------------------------------------

def cmd_tokenizer_train(args) -> int:
    import time

    from model.tokenizer import train_tokenizer_from_files

    start = time.perf_counter()
    tok = train_tokenizer_from_files(args.input, args.vocab_size, args.out)
    print(f"trained {tok.n_vocab}-token BPE in {time.perf_counter() - start:.1f}s -> {args.out} (sha256 {tok.sha256[:12]})")
    return 0


def cmd_export(args) -> int:
    from model.export import export_hf, load_model_dir, save_model_dir

    model, tokenizer, meta = load_model_dir(args.source)
    if args.format == "hf":
        export_hf(model, tokenizer, args.out)
    else:
        save_model_dir(model, tokenizer, args.out, provenance={"exported_from": str(Path(args.source).resolve())})
    print(f"wrote {args.format} model directory {args.out}")
    return 0


def _sampling(args):
    from model.generate import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise RelayError(f"--{str(exc).split(' ')[0].replace('_', '-')}: {exc}") from None


def cmd_generate(args) -> int:
    from model.export import load_model_dir
    from model.generate import prepare_for_inference
    from pipelines.generation import complete_rows, read_prompts, write_jsonl

    params = _sampling(args)
    rows = read_prompts(args.prompts)
    model, tokenizer, _ = load_model_dir(args.model_dir)
    prepare_for_inference(model)
    results = complete_rows(model, tokenizer, rows, params, chat=args.chat, batch_size=args.batch_size, where=args.prompts)
    write_jsonl(results, args.out)
    print(f"wrote {len(results)} completions to {args.out}")
    return 0


def cmd_chat(args) -> int:
    from model.export import load_model_dir
    from model.generate import prepare_for_inference
    from pipelines.chat import COMMANDS, ChatSession

    params = _sampling(args)
    model, tokenizer, _ = load_model_dir(args.model_dir)
    prepare_for_inference(model)
    session = ChatSession(model, tokenizer, system=args.system, params=params)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model_dir} ({COMMANDS})")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            message = session.command(line)
            if message is None:
                break
            print(message, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except RelayError as exc:
            print(f"(error: {exc})", end="")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
