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

from cluster.console import quiet_ray, third_party_to
from cluster.data_commands import cmd_data_inspect, cmd_data_prepare, cmd_data_verify, cmd_tokenizer_train, from_here, job_and_run_dir
from cluster.generation_commands import cmd_chat, cmd_eval, cmd_generate
from jobs.cluster import check_ray_address
from model.errors import RelayError, StageFailed

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
    from cluster.stopping import stopping

    args = build_parser().parse_args(argv)
    _tools_beside_the_interpreter()
    try:
        # SIGINT / SIGTERM end the command and everything it started (Ray, ranks) within seconds,
        # at any phase; nothing it started outlives it.
        with stopping():
            return args.func(args) or 0
    except RelayError as exc:
        print(f"relaygpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as exc:
        print(f"relaygpt: {exc} (full log: {exc.log})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("relaygpt: interrupted", file=sys.stderr)
        return 130


# ---- arguments shared by several commands -------------------------------------------------

def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a job field (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory, relative to this folder (default: the job's output_dir, relative to the job file)")
    p.add_argument("--run-id", default="default", help="run directory name under OUT/<job-name>/ (default: default)")


def _sampling_args(temperature: float):
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})")
        p.add_argument("--top-k", type=_positive_int, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--max-new-tokens", type=_positive_int, default=128)
        p.add_argument("--seed", type=int, default=None)
    return add


def _run_args(p):
    _job_args(p)
    p.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster.address, else embedded)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its newest checkpoint")
    p.add_argument("--from-stage", default=None, choices=("data", "pretrain", "sft", "dpo", "eval"), help="re-run this stage and the ones after it")


def _submit_args(p):
    _job_args(p)
    p.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HOST:8265")
    p.add_argument("--resume", action="store_true")


def _jobs_args(action: str):
    def add(p):
        if action != "list":
            p.add_argument("job_id", metavar="ID")
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.add_argument("--address", required=True, help="http://HOST:8265")
    return add


def _tokenizer_train_args(p):
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--vocab-size", type=_positive_int, required=True, help="full vocabulary, special tokens included")
    p.add_argument("--out", required=True, metavar="DIR")


def _inspect_args(p):
    _job_args(p)
    p.add_argument("--stage", choices=("pretrain", "sft"), default="sft")
    p.add_argument("-n", type=_positive_int, default=3, dest="num_samples", help="samples to show")


def _eval_args(p):
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--task", required=True, action="append", metavar="NAME_OR_FILE", help="task name or task YAML (repeatable)")
    p.add_argument("--job", default=None, metavar="JOB.yaml", help="the job whose synthetic world the 'synthetic' task uses")
    p.add_argument("--data", default=None, metavar="FILE", help="local data file for the task (instead of its source)")
    p.add_argument("--workers", type=_positive_int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where one worker runs the model (auto: the GPU if any)")
    p.add_argument("--style", choices=("auto", "chat", "completion"), default="auto",
                   help="how to prompt: auto is chat for an SFT export (its chat template), completion otherwise")
    p.add_argument("--system", default=None, metavar="TEXT", help="system prompt when prompting through the chat template")
    p.add_argument("--limit", type=_positive_int, default=None, help="examples per task")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--out", default=None, metavar="DIR", help="write predictions.jsonl, metrics.json, report.md here")
    p.add_argument("--address", default=None)


def _size(text: str) -> int:
    from model.weights_file import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _export_args(p):
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN_DIR", help="a native or Hugging Face GPT-2 model directory")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", choices=("native", "hf"), default="native")
    p.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="--format hf: weights above this go into shards with an index, as the hub lays them out (default 5GB)")


def _generate_args(p):
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template, stop at end of turn")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--workers", type=_positive_int, default=1, help="generation workers; more than 1 runs a Ray Data actor pool")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where one worker runs the model (auto: the GPU if there is one, in bf16); pool workers use the device they reserved")
    p.add_argument("--address", default=None, help="Ray cluster for --workers (default: embedded)")
    _sampling_args(0.0)(p)


def _sweep_args(p):
    p.add_argument("sweep", metavar="SWEEP.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a sweep field")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory, relative to this folder (default: the sweep's output_dir)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: embedded)")


def _chat_args(p):
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--system", default=None, metavar="TEXT")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU if there is one, in bf16")
    _sampling_args(0.7)(p)


# ---- commands -----------------------------------------------------------------------------

def cmd_run(args) -> int:
    from cluster.console import terminal
    from cluster.driver import RunOptions, format_summary, run_job
    from cluster.startup import StartupClock, process_started_at

    clock = StartupClock(started_at=process_started_at())  # the start-up counts from the command's own start
    quiet_ray()
    check_ray_address(args.address)
    job, run_dir = job_and_run_dir(args)
    console = terminal()  # every line of ours goes through it: a reader that goes away (| head) silences it, no more
    console.line(f"relaygpt run {job.name} -> {run_dir.root}")
    # Ray's, DeepSpeed's and the workers' lines go to the run's log; the terminal keeps relaygpt's.
    try:
        options = RunOptions(address=args.address, resume=args.resume, from_stage=args.from_stage, show=console.line,
                             live=console.progress if console.live else None, log_output=True, clock=clock)
        summary = run_job(job, run_dir, options)
    finally:
        console.done()  # an error line starts below the last progress line, not on it
    console.line(format_summary(summary))
    return 0


def cmd_plan(args) -> int:
    from cluster.preflight import check, cluster_problems, format_plan

    job, run_dir = job_and_run_dir(args)
    run, problems = check(job, run_dir)
    if job.cluster.address:  # a named cluster: check it has the resources, as relaygpt run does
        problems += cluster_problems(job)
    print(format_plan(job, run, problems))
    return EXIT_USAGE if problems else 0


def cmd_export(args) -> int:
    from model.export import export_hf, load_model_dir, save_model_dir
    from model.owned import check_owned

    check_owned(args.out, "model", "--out")  # a user's folder is refused before the model is read
    model, tokenizer, meta = load_model_dir(args.source)
    if args.format == "hf":
        export_hf(model, tokenizer, args.out, max_shard_bytes=args.max_shard_size)
    else:
        save_model_dir(model, tokenizer, args.out, provenance={"exported_from": str(Path(args.source).resolve())})
    print(f"wrote {args.format} model directory {args.out}")
    return 0


def cmd_sweep(args) -> int:
    from cluster.sweep import run_sweep
    from jobs.sweep import load_sweep
    from model.owned import claim
    from pipelines.accounting import describe_usage
    from pipelines.run_state import check_output_path

    sweep = load_sweep(args.sweep, args.overrides)
    sweep_dir = sweep.sweep_dir(from_here(args.out))
    check_output_path(sweep_dir, "--out" if args.out else "output_dir")
    out_dir = claim(sweep_dir.resolve(), "sweep", "sweep directory")
    print(f"relaygpt sweep {sweep.name} -> {out_dir}", flush=True)
    log = out_dir / "logs" / "run.log"
    print(f"[sweep] Ray, DeepSpeed and worker output: {log}", flush=True)
    with third_party_to(log) as console:
        summary = run_sweep(sweep, out_dir, address=args.address, show=console.line)
    print(f"\ndone: sweep {sweep.name} in {summary['seconds']:.0f}s, {describe_usage(summary['cost'])}")
    for key in ("results", "report"):
        print(f"  {key:<10} {summary['paths'][key]}")
    for plot in summary["paths"]["plots"]:
        print(f"  {'plot':<10} {plot}")
    return 0


def cmd_submit(args) -> int:
    from cluster.submit import check_dashboard_address, submit

    check_dashboard_address(args.address)
    job, run_dir = job_and_run_dir(args)
    job_id = submit(job, args.address, run_dir=run_dir, run_id=args.run_id, out=args.out, resume=args.resume)
    print(f"submitted {job.name} as {job_id}")
    print(f"  follow:  relaygpt jobs logs {job_id} --follow --address {args.address}")
    print(f"  status:  relaygpt jobs status {job_id} --address {args.address}")
    print(f"  stop:    relaygpt jobs stop {job_id} --address {args.address}")
    return 0


def cmd_jobs(args) -> int:
    from cluster import submit as jobs

    jobs.check_dashboard_address(args.address)
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


# ---- registration: one line per command -----------------------------------------------------

COMMANDS = [
    ("run", "run a job's stages (an embedded Ray when a stage needs one, or --address)", _run_args, cmd_run),
    ("plan", "pre-flight: topology, batch arithmetic, memory per pipeline stage, problems", _job_args, cmd_plan),
    ("submit", "submit a job to a Ray cluster (Ray Jobs)", _submit_args, cmd_submit),
    ("jobs list", "submitted jobs", _jobs_args("list"), cmd_jobs),
    ("jobs status", "a job's status", _jobs_args("status"), cmd_jobs),
    ("jobs logs", "a job's output", _jobs_args("logs"), cmd_jobs),
    ("jobs stop", "stop a job", _jobs_args("stop"), cmd_jobs),
    ("eval", "evaluate one model directory on a task (generation workers on Ray)", _eval_args, cmd_eval),
    ("data prepare", "tokenizer + token shards for every data stage of a job", _job_args, cmd_data_prepare),
    ("data inspect", "rendered samples and statistics of a prepared stage", _inspect_args, cmd_data_inspect),
    ("data verify", "re-hash every prepared shard against its manifest (training starts check sizes only)", _job_args, cmd_data_verify),
    ("tokenizer train", "train a byte-level BPE on text files (the tokenizers library's trainer)", _tokenizer_train_args, cmd_tokenizer_train),
    ("export", "write a model directory (native or Hugging Face GPT-2)", _export_args, cmd_export),
    ("generate", "generate completions for a JSONL file of prompts", _generate_args, cmd_generate),
    ("sweep", "measure a job across a grid of layouts / sizes: results.csv, report.md, plots", _sweep_args, cmd_sweep),
    ("chat", "chat with a model in the terminal", _chat_args, cmd_chat),
]
GROUPS = {"jobs": "list, inspect, follow and stop submitted jobs", "data": "prepare and inspect a job's data", "tokenizer": "tokenizer tools"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaygpt", description="Train, fine-tune, evaluate and chat with GPT models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, helptext, add_arguments, handler in COMMANDS:
        group, _, action = name.partition(" ")
        if action:
            if group not in groups:
                groups[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                    dest=f"{group}_command", required=True, metavar="ACTION")
            command = groups[group].add_parser(action, help=helptext)
        else:
            command = sub.add_parser(name, help=helptext)
        add_arguments(command)
        command.set_defaults(func=handler)
    return parser


if __name__ == "__main__":
    sys.exit(main())
