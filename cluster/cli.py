"""The `relaygpt` command: parse, resolve, call a function.

Heavy libraries are imported inside the commands, so `relaygpt --help` stays fast. Errors a
user can cause (`RelayError`) print one line and exit 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
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

    sub_p = sub.add_parser("submit", help="submit a job to a Ray cluster (Ray Jobs)")
    _add_job_args(sub_p)
    sub_p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HOST:8265")
    sub_p.add_argument("--resume", action="store_true")
    sub_p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, helptext in (("list", "submitted jobs"), ("status", "a job's status"), ("logs", "a job's output"), ("stop", "stop a job")):
        jp = jobs_sub.add_parser(name, help=helptext)
        if name != "list":
            jp.add_argument("job_id", metavar="ID")
        if name == "logs":
            jp.add_argument("--follow", action="store_true", help="stream until the job ends")
        jp.add_argument("--address", required=True, help="http://HOST:8265")
        jp.set_defaults(func=cmd_jobs)

    ev = sub.add_parser("eval", help="evaluate one model directory on a task (generation workers on Ray)")
    ev.add_argument("model_dir", metavar="MODEL_DIR")
    ev.add_argument("--task", required=True, action="append", metavar="NAME_OR_FILE", help="task name or task YAML (repeatable)")
    ev.add_argument("--job", default=None, metavar="JOB.yaml", help="the job whose synthetic world the 'synthetic' task uses")
    ev.add_argument("--data", default=None, metavar="FILE", help="local data file for the task (instead of its source)")
    ev.add_argument("--workers", type=_positive_int, default=1)
    ev.add_argument("--limit", type=_positive_int, default=None, help="examples per task")
    ev.add_argument("--batch-size", type=_positive_int, default=16)
    ev.add_argument("--out", default=None, metavar="DIR", help="write predictions.jsonl, metrics.json, report.md here")
    ev.add_argument("--address", default=None)
    ev.set_defaults(func=cmd_eval)

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
    gen.add_argument("--workers", type=_positive_int, default=1, help="generation workers; more than 1 runs a Ray Data actor pool")
    gen.add_argument("--address", default=None, help="Ray cluster for --workers (default: embedded)")
    _add_sampling(gen, temperature=0.0)
    gen.set_defaults(func=cmd_generate)

    sweep = sub.add_parser("sweep", help="measure a job across a grid of layouts / sizes: results.csv, report.md, plots")
    sweep.add_argument("sweep", metavar="SWEEP.yaml")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a sweep field")
    sweep.add_argument("--out", default=None, metavar="DIR", help="output directory (default: the sweep's output_dir)")
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")
    sweep.set_defaults(func=cmd_sweep)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model_dir", metavar="MODEL_DIR")
    chat.add_argument("--system", default=None, metavar="TEXT")
    _add_sampling(chat, temperature=0.7)
    chat.set_defaults(func=cmd_chat)
    return parser


def _tools_beside_the_interpreter() -> None:
    """Put this interpreter's bin directory first on PATH, as activating its venv would.

    Every process of a run (Ray workers inherit the driver's environment) then finds the
    same tools, ninja above all: DeepSpeed JIT-builds its CPU comm op with whichever ninja is
    on PATH, and two ninjas of different versions disagree about the build log, so a run
    started without the venv activated rebuilt the op (45 s on 2 cores) after every run that
    was started with it.
    """
    bin_dir = os.path.dirname(sys.executable)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in parts if p and p != bin_dir])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _tools_beside_the_interpreter()
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
    if job.cluster.address:  # a named cluster: check it has the resources, as relaygpt run does
        from cluster.driver import cluster_problems

        problems += cluster_problems(job)
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
    from pipelines.generation import prompt_ids, read_prompts, write_jsonl

    params = _sampling(args)
    rows = read_prompts(args.prompts)
    _, tokenizer, _ = load_model_dir(args.model_dir)  # checks the directory and every row before any worker starts
    for i, row in enumerate(rows):
        prompt_ids(row, tokenizer, args.chat, f"{args.prompts}:{row.get('_line', i + 1)}")
    results = _generate_rows(args.model_dir, rows, params.__dict__, args.chat, args.workers, args.batch_size, args.address)
    write_jsonl(results, args.out)
    print(f"wrote {len(results)} completions to {args.out}")
    return 0


def _generate_rows(model_dir, rows, params: dict, chat: bool, workers: int, batch_size: int, address=None):
    """In this process for one worker; a Ray Data actor pool for more."""
    if workers == 1:
        from pipelines.evaluate import GenerationWorker

        worker = GenerationWorker(str(model_dir), params, chat, batch_size)
        return [worker.generate_rows([dict(r) for r in rows])][0]
    from cluster.launch import generate_on_ray
    from cluster.runtime import ray_session

    with ray_session(address, num_cpus=workers):
        return generate_on_ray(str(model_dir), rows, params, chat=chat, workers=workers, batch_size=batch_size)


def cmd_sweep(args) -> int:
    from cluster.sweep import run_sweep
    from jobs.sweep import load_sweep
    from pipelines.accounting import describe_usage

    sweep = load_sweep(args.sweep, args.overrides)
    out_dir = sweep.sweep_dir(args.out).resolve()
    print(f"relaygpt sweep {sweep.name} -> {out_dir}", flush=True)
    summary = run_sweep(sweep, out_dir, address=args.address, show=lambda line: print(line, flush=True))
    print(f"\ndone: sweep {sweep.name} in {summary['seconds']:.0f}s, {describe_usage(summary['cost'])}")
    for key in ("results", "report"):
        print(f"  {key:<10} {summary['paths'][key]}")
    for plot in summary["paths"]["plots"]:
        print(f"  {'plot':<10} {plot}")
    return 0


def cmd_submit(args) -> int:
    from cluster.submit import submit

    job, _ = _job_and_run_dir(args)
    job_id = submit(job, args.address, run_id=args.run_id, out=args.out, resume=args.resume)
    print(f"submitted {job.name} as {job_id}")
    print(f"  follow:  relaygpt jobs logs {job_id} --follow --address {args.address}")
    print(f"  status:  relaygpt jobs status {job_id} --address {args.address}")
    print(f"  stop:    relaygpt jobs stop {job_id} --address {args.address}")
    return 0


def cmd_jobs(args) -> int:
    from cluster import submit as jobs

    if args.jobs_command == "list":
        rows = jobs.list_jobs(args.address)
        print(f"{'ID':<28} {'STATUS':<10} {'JOB':<20} ENTRYPOINT")
        for r in rows:
            print(f"{r['id']:<28} {r['status']:<10} {r['job']:<20} {r['entrypoint']}")
    elif args.jobs_command == "status":
        print(jobs.status(args.address, args.job_id))
    elif args.jobs_command == "logs":
        if args.follow:
            state = jobs.follow(args.address, args.job_id, lambda text: print(text, end="", flush=True))
            print(f"\n[job {args.job_id} {state}]")
            return 0 if state == "SUCCEEDED" else 1
        print(jobs.logs(args.address, args.job_id), end="")
    else:
        print("stop requested" if jobs.stop(args.address, args.job_id) else "the job had already ended")
    return 0


def cmd_eval(args) -> int:
    import json

    from model.export import load_model_dir
    from model.chat import strip_reply
    from pipelines.evaluate import apply_stops, load_task, render_prompt, score, summarise, write_report

    job = None
    if args.job:
        from jobs.spec import load_job

        job = load_job(args.job)
    tasks = [load_task(t, job=job, limit=args.limit, data_file=args.data) for t in args.task]
    load_model_dir(args.model_dir)
    metrics, predictions = {"model": {}}, []
    for task in tasks:
        if task.metric == "bpb":
            from pipelines.evaluate import bits_per_byte_of_texts

            metrics["model"][task.name] = bits_per_byte_of_texts(args.model_dir, [ex["target"] for ex in task.examples])
            print(f"{task.name}: {metrics['model'][task.name]:.4f} bits per byte ({len(task.examples)} texts)")
            continue
        rows = [render_prompt(task, ex) for ex in task.examples]
        params = {"max_new_tokens": task.max_new_tokens}
        results = _generate_rows(args.model_dir, rows, params, task.style == "chat", args.workers, args.batch_size, args.address)
        scored = []
        for ex, res in zip(task.examples, results):
            text = apply_stops(res["completion"], task.stop)
            text = strip_reply(text) if task.style == "chat" else text
            ok = score(task.metric, text, ex["target"])
            scored.append(ok)
            predictions.append({"model": "model", "task": task.name, "input": ex["input"], "reference": ex["target"], "prediction": text, "correct": ok})
        metrics["model"][task.name] = summarise(task, scored)
        print(f"{task.name}: {metrics['model'][task.name]:.3f} ({sum(scored)}/{len(scored)})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        write_report(out, metrics, predictions)
        print(f"wrote {out}")
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
