"""`relaygpt generate`, `relaygpt eval` and `relaygpt chat`: a model directory's completions (or
scores), in this process or on a Ray Data actor pool (`generate_rows`, the local-or-pool
choice), and a chat on the terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cluster.console import third_party_to
from jobs.cluster import check_ray_address
from model.errors import RelayError


def sampling(args):
    from model.generate import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise RelayError(f"--{str(exc).split(' ')[0].replace('_', '-')}: {exc}") from None


def cmd_generate(args) -> int:
    from model.atomic import write_jsonl_atomically
    from model.export import load_model_dir
    from pipelines.generation.rows import prompt_ids, read_prompts

    params = sampling(args)
    check_ray_address(args.address)
    check_output_file(args.out, "--out")
    _check_generation_output(Path(args.out), "--out")
    rows = read_prompts(args.prompts)
    model, tokenizer, _ = load_model_dir(args.model_dir)  # checks the directory and every row before any worker starts
    for i, row in enumerate(rows):
        prompt_ids(row, tokenizer, args.chat, f"{args.prompts}:{row.get('_line', i + 1)}", model.config.block_size)
    del model
    if args.workers > 1:
        print(f"Ray and generation worker output: {args.out}.log", flush=True)
    results = generate_rows(args.model_dir, rows, params.__dict__, args.chat, args.workers, args.batch_size, args.address,
                             device=args.device, log=Path(f"{args.out}.log"))
    write_jsonl_atomically(args.out, results)
    print(f"wrote {len(results)} completions to {args.out}")
    return 0


def _check_generation_output(out: Path, flag: str) -> None:
    """`generate --out FILE` replaces FILE and appends to FILE.log: only where FILE is absent,
    empty or an earlier generation's output (its first row has `completion` and `finish_reason`),
    and FILE.log absent or beside such a FILE. Anything else is a user's file, refused."""
    ours = out.is_file() and _is_generation_output(out)
    if out.exists() and not ours and out.stat().st_size:
        raise RelayError(f"{flag} {out}: is a file relaygpt did not write (not a generation output); "
                         "refusing to replace it (give a new file name)")
    log = Path(f"{out}.log")
    if (log.exists() or log.is_symlink()) and not (ours and log.is_file() and not log.is_symlink()):
        raise RelayError(f"{flag} {out}: {log} exists and was not written by relaygpt generate; "
                         "refusing to append to it (give another --out or move that file)")


def _is_generation_output(path: Path) -> bool:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 20)
        row = json.loads(first)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(row, dict) and "completion" in row and "finish_reason" in row


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output file that could not be written, before any work is done for it."""
    path = Path(path)
    if path.is_dir():
        raise RelayError(f"{flag} {path}: is a directory; give a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RelayError(f"{flag} {path}: {parent} is a file, not a directory")
            break


def generate_rows(model_dir, rows, params: dict, chat: bool, workers: int, batch_size: int, address, device: str, log: Path,
                  work: str = "complete"):
    """`work` (GenerationWorker's) on `rows`: in this process for one worker (on `device`); a Ray
    Data actor pool for more, whose lines (Ray's, the workers') go to `log`."""
    if workers == 1:
        from pipelines.generation.worker import GenerationWorker

        return GenerationWorker(str(model_dir), params, chat, batch_size, device=device, work=work).run([dict(r) for r in rows])
    from cluster.launch import generate_on_ray
    from cluster.runtime import ray_session

    with third_party_to(log), ray_session(address, num_cpus=workers):
        return generate_on_ray(str(model_dir), rows, params, chat=chat, workers=workers, batch_size=batch_size, work=work)


def cmd_eval(args) -> int:
    """One model directory on the given tasks: the eval stage's own entry (cluster/evaluation.py),
    its generation in this process for one worker, else on a pool of its own."""
    from cluster.evaluation import load_tasks, run_eval
    from model.export import load_model_dir
    from pipelines.eval.settings import EvalPlan
    from pipelines.rundir import EvalDir

    from pipelines.run_state import check_output_path

    check_ray_address(args.address)
    if args.out:
        check_output_path(args.out, "--out")
    job = None
    if args.job:
        from jobs.spec import load_job

        job = load_job(args.job)
    plan = EvalPlan(models={"model": Path(args.model_dir)}, tasks=tuple(args.task), synthetic=job.data.synthetic if job else None,
                    seed=None, limit=args.limit, workers=args.workers, batch_size=args.batch_size, system_prompt=args.system)
    tasks = load_tasks(plan, data_file=args.data)
    load_model_dir(args.model_dir)

    import tempfile

    from model.owned import check_owned, claim

    out = EvalDir(Path(args.out)) if args.out else None
    if out is not None:
        check_owned(out.root, "eval", "--out")  # a user's folder is refused before any work
    log = out.root / "logs" / "run.log" if out is not None else Path(tempfile.gettempdir()) / f"relaygpt-eval-{os.getpid()}.log"

    def place(model_dir, rows, params, *, chat, work, progress):
        if out is not None:  # created and marked at the first write (the pool's log), not before the checks
            claim(out.root, "eval", "--out")
        return generate_rows(model_dir, rows, params, chat, plan.workers, plan.batch_size, args.address, device=args.device,
                             log=log, work=work)

    if args.workers > 1:
        print(f"[eval] Ray and generation worker output: {log}", flush=True)
    run_eval(plan, out, place, tasks=tasks, show=lambda line: print(line, flush=True),
             styles={"model": args.style} if args.style != "auto" else None)
    if out is not None:
        print(f"wrote {out.root}")
    return 0


def cmd_chat(args) -> int:
    from model.export import load_model_dir
    from model.generate import prepare_for_inference
    from pipelines.generation.chat import COMMANDS, ChatSession

    from pipelines.generation.worker import pick_device

    params = sampling(args)
    device, dtype = pick_device(args.device)
    model, tokenizer, _ = load_model_dir(args.model_dir, device=device, dtype=dtype)
    if device == "cpu":
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
