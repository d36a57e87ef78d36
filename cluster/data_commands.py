"""`relaygpt data prepare | inspect | verify` and `relaygpt tokenizer train`, and how every job
command finds its job and run directory (`job_and_run_dir`)."""

from __future__ import annotations

from pathlib import Path

from cluster.console import third_party_to
from model.errors import RelayError


def job_and_run_dir(args):
    """The job (validated, overridden) and the run directory --out / --run-id chose."""
    from jobs.spec import load_job
    from pipelines.rundir import RunDir

    from pipelines.run_state import check_output_path

    job = load_job(args.job, args.overrides)
    root = job.run_dir(args.run_id, from_here(args.out))
    check_output_path(root, "--out" if args.out else "output_dir")
    return job, RunDir(root)


def from_here(path: str | None) -> str | None:
    """A path given on the command line, absolute: a relative one is relative to the folder the
    command runs in (as every shell user expects), never to the job file's folder."""
    return None if path is None else str(Path(path).expanduser().absolute())


def cmd_data_prepare(args) -> int:
    import time

    from cluster.launch import blocks_runner
    from jobs.plan import data_plan
    from pipelines.data.prepare import prepare_data, validation_warning

    job, run_dir = job_and_run_dir(args)
    start = time.perf_counter()
    with run_dir.hold(), third_party_to(run_dir.log_file) as console, blocks_runner(job) as run_blocks:
        result = prepare_data(data_plan(job), run_dir, run_blocks=run_blocks, show=console.line)
    print(f"tokenizer {result['tokenizer'].name} ({result['tokenizer'].n_vocab} ids) -> {run_dir.tokenizer}")
    for stage in ("pretrain", "sft", "dpo"):
        if stage in result:
            m = result[stage]
            state = "up to date" if m["cached"] else "prepared"
            counts = ", ".join(f"{name} {split['tokens']} tokens" for name, split in m["splits"].items())
            print(f"{stage}: {state} ({counts}) -> {run_dir.data(stage)}")
            warning = validation_warning(stage, m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"])
            if warning:
                print(f"warning: {warning}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_data_verify(args) -> int:
    from pipelines.data.shards import read_manifest, verify_shards

    job, run_dir = job_and_run_dir(args)
    checked = 0
    for stage in ("pretrain", "sft", "dpo"):
        if getattr(job.data, stage) is None:
            continue
        directory = run_dir.data(stage)
        manifest = read_manifest(directory)
        if manifest is None:
            raise RelayError(f"{directory}: not prepared yet (relaygpt data prepare {args.job})")
        verify_shards(directory, manifest, full=True)
        shards = sum(len(split["shards"]) for split in manifest["splits"].values())
        tokens = sum(split["tokens"] for split in manifest["splits"].values())
        print(f"{stage}: {shards} shards, {tokens} tokens: every sha256 matches {directory / 'manifest.json'}")
        checked += 1
    if not checked:
        raise RelayError(f"{args.job}: the job has no data section to verify")
    return 0


def cmd_data_inspect(args) -> int:
    from cluster.launch import blocks_runner
    from jobs.plan import data_plan, resolve_plan
    from pipelines.data.inspect import describe
    from pipelines.data.prepare import prepare_data

    job, run_dir = job_and_run_dir(args)
    if getattr(job.data, args.stage) is None:
        raise RelayError(f"{args.job}: the job has no data.{args.stage} section")
    with run_dir.hold(), blocks_runner(job) as run_blocks:
        result = prepare_data(data_plan(job), run_dir, stages=(args.stage,), run_blocks=run_blocks)
    training = resolve_plan(job, run_dir, vocab_size=result["tokenizer"].n_vocab).training
    seq_len = training[args.stage].seq_len if args.stage in training else job.model.block_size
    print(describe(run_dir.data(args.stage), result["tokenizer"], args.num_samples, seq_len))
    return 0


def cmd_tokenizer_train(args) -> int:
    import time

    from model.tokenizer import train_tokenizer_from_files, vocabulary_shortfall

    start = time.perf_counter()
    tok = train_tokenizer_from_files(args.input, args.vocab_size, args.out)
    print(f"trained {tok.n_vocab}-token BPE in {time.perf_counter() - start:.1f}s -> {args.out} (sha256 {tok.sha256[:12]})")
    shortfall = vocabulary_shortfall(tok, args.vocab_size)
    if shortfall:
        print(f"warning: {shortfall}")
    return 0
