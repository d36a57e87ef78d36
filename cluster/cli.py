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


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a job field (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the job's output_dir)")
    p.add_argument("--run-id", default="default", help="run directory name under OUT/<job-name>/ (default: default)")


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

    run = sub.add_parser("run", help="run a job's stages on Ray (embedded, or --address)")
    _add_job_args(run)
    run.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster.address, else embedded)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted stage from its newest checkpoint")
    run.add_argument("--from-stage", default=None, choices=("data", "pretrain", "sft", "eval"), help="re-run this stage and the ones after it")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="pre-flight: topology, batch arithmetic, memory per pipeline stage, problems")
    _add_job_args(plan)
    plan.set_defaults(func=cmd_plan)

    data = sub.add_parser("data", help="prepare and inspect a job's data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser("prepare", help="tokenizer + token shards for every data stage of a job")
    inspect = data_sub.add_parser("inspect", help="rendered samples and statistics of a prepared stage")
    for p in (prep, inspect):
        _add_job_args(p)
    prep.set_defaults(func=cmd_data_prepare)
    inspect.add_argument("--stage", choices=("pretrain", "sft"), default="sft")
    inspect.add_argument("-n", type=_positive_int, default=3, dest="num_samples", help="samples to show")
    inspect.set_defaults(func=cmd_data_inspect)

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


def _job_and_run_dir(args):
    from jobs.spec import load_job

    job = load_job(args.job, args.overrides)
    return job, job.run_dir(args.run_id, args.out).resolve()


def cmd_run(args) -> int:
    from cluster.driver import format_summary, run_job

    job, run_dir = _job_and_run_dir(args)
    print(f"relaygpt run {job.name} -> {run_dir}", flush=True)
    summary = run_job(job, run_dir, address=args.address, resume=args.resume, from_stage=args.from_stage,
                      show=lambda line: print(line, flush=True))
    print(format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    from cluster.plan import format_plan, plan_job

    job, _ = _job_and_run_dir(args)
    plans, problems = plan_job(job)
    print(format_plan(job, plans, problems))
    return EXIT_USAGE if problems else 0


def cmd_data_prepare(args) -> int:
    import time

    from pipelines.data.prepare import prepare_data

    job, run_dir = _job_and_run_dir(args)
    start = time.perf_counter()
    result = prepare_data(job, run_dir)
    print(f"tokenizer {result['tokenizer'].name} ({result['tokenizer'].n_vocab} ids) -> {run_dir / 'tokenizer'}")
    for stage in ("pretrain", "sft"):
        if stage in result:
            m = result[stage]
            state = "up to date" if m["cached"] else "prepared"
            counts = ", ".join(f"{name} {split['tokens']} tokens" for name, split in m["splits"].items())
            print(f"{stage}: {state} ({counts}) -> {run_dir / 'data' / stage}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_data_inspect(args) -> int:
    from pipelines.data.inspect import describe
    from pipelines.data.prepare import prepare_data

    job, run_dir = _job_and_run_dir(args)
    if args.stage == "pretrain" and job.data.pretrain is None or args.stage == "sft" and job.data.sft is None:
        raise RelayError(f"{args.job}: the job has no data.{args.stage} section")
    result = prepare_data(job, run_dir, stages=(args.stage,))
    seq_len = job.model.config(result["tokenizer"].n_vocab).block_size
    print(describe(run_dir / "data" / args.stage, result["tokenizer"], args.num_samples, seq_len))
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
