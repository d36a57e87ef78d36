"""The training worker under plain torchrun (no Ray): the same function Ray Train runs.

    torchrun --nproc-per-node 2 -m cluster.torchrun JOB.yaml --stage pretrain [--set K=V]... [--run-dir DIR]

Rank 0 prepares the tokenizer and data (cached, so usually a no-op) while the others wait,
then every rank trains the stage. GPU measurements use this path on machines without Ray.
"""

from __future__ import annotations

import argparse
import sys

from model.errors import RelayError


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number (1 or more), got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a step number (1 or more), got {value}: step 0 is before the first step")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.torchrun")
    parser.add_argument("job", metavar="JOB.yaml")
    parser.add_argument("--stage", choices=("pretrain", "sft", "dpo"), required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--run-dir", default=None, help="default: OUT/<name>/default from the job file")
    parser.add_argument("--until-step", type=_step, default=None, help="stop (checkpointed) at this step (1 or more)")
    args = parser.parse_args(argv)
    try:
        import torch
        import torch.distributed as dist

        from jobs.plan import data_plan, resolve_plan
        from jobs.spec import load_job
        from pipelines.data.prepare import prepare_data
        from pipelines.rundir import RunDir
        from pipelines.train.distributed import init_distributed
        from pipelines.train.entry import train_stage

        job = load_job(args.job, args.overrides)
        from pipelines.run_state import check_output_path
        from pipelines.train.tracking import missing_packages

        for problem in missing_packages(job.tracking):  # every rank, before any waits for another
            raise RelayError(problem)

        check_output_path(args.run_dir or job.run_dir(), "--run-dir" if args.run_dir else "output_dir")
        run_dir = RunDir(args.run_dir or job.run_dir())
        init_distributed()
        if dist.get_world_size() != job.cluster.num_workers:
            raise RelayError(f"cluster.num_workers is {job.cluster.num_workers} but torchrun started {dist.get_world_size()} "
                             f"processes; pass --set cluster.num_workers={dist.get_world_size()}")
        # Rank 0 is the driver: it prepares the data and resolves the plan once; every rank trains on that plan.
        shipped = [None]
        if dist.get_rank() == 0:
            tokenizer = prepare_data(data_plan(job), run_dir, stages=(args.stage,))["tokenizer"]
            shipped = [resolve_plan(job, run_dir, vocab_size=tokenizer.n_vocab, device="cuda" if torch.cuda.is_available() else "cpu")]
        dist.broadcast_object_list(shipped, src=0)
        result = train_stage(shipped[0], args.stage, until_step=args.until_step)
        if dist.get_rank() == 0:
            print(f"[{args.stage}] done: {result['step']} steps, model -> {result.get('model_dir', '(not exported: stopped early)')}")
        return 0
    except RelayError as exc:
        print(f"relaygpt worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
