"""`relaygpt data prepare`: the tokenizer and every data stage of a job, each cached.

    RUN/tokenizer/     the run's tokenizer (standard, file, directory or trained BPE)
    RUN/data/pretrain  token shards + manifest
    RUN/data/sft       packed rows + loss masks + manifest

A stage whose inputs (files' contents, source settings, tokenizer) have the same fingerprint
as its manifest records is not redone; any change re-prepares it. The tokenizer's fingerprint
covers the contents of its file or directory too. File digests are cached in
RUN/input_hashes.json (pipelines/inputs.py), shared with the driver's stage fingerprints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.errors import RelayError
from model.atomic import atomic_dir
from model.tokenizer import Tokenizer
from pipelines.data.data_plan import DataPlan
from pipelines.inputs import FileHashes

PREP_VERSION = 4  # bump when the on-disk format or the processing changes (2: SFT manifests record eot_id;
# 3: shards per block and per source, weights no longer applied at preparation; 4: text that is not valid in its
# encoding refused instead of replaced, a source's `encoding:`, a file reached by several links read once)
MAX_VAL_SHARE = 0.25  # a validation split holding more of a stage's tokens than this is reported


def _files_of(plan: DataPlan, source) -> list[Path]:
    from pipelines.data.sources import _files

    return _files(plan, source) if source.type in ("text", "json", "parquet", "csv") else []


def data_inputs(plan: DataPlan, hashes: FileHashes | None = None) -> dict[str, str]:
    """{file: sha256} of what the data stage reads: every local source file of data.pretrain and
    data.sft, and the tokenizer's file or directory (a hub source is named by its settings)."""
    hashes = hashes or FileHashes()
    sources = [s for section in (plan.data.pretrain, plan.data.sft, plan.data.dpo) if section is not None for s in section.sources]
    out = {plan.label(path): hashes.sha256(path) for source in sources for path in _files_of(plan, source)}
    return {**out, **_tokenizer_inputs(plan, hashes)}


def _tokenizer_inputs(plan: DataPlan, hashes: FileHashes) -> dict[str, str]:
    spec = plan.tokenizer
    if spec.file:
        return {plan.label(plan.path(spec.file)): hashes.sha256(plan.path(spec.file))}
    if spec.dir:
        return hashes.directory(plan.path(spec.dir), plan.label(plan.path(spec.dir)))
    return {}


def sources_fingerprint(plan: DataPlan, sources, hashes: FileHashes | None = None, **extra) -> str:
    """sha256 of everything that decides a stage's output."""
    hashes = hashes or FileHashes()
    digest = hashlib.sha256(json.dumps({"version": PREP_VERSION, **extra}, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(json.dumps(source.model_dump(mode="json"), sort_keys=True).encode())
        if source.type == "synthetic":
            digest.update(json.dumps(plan.data.synthetic.model_dump(mode="json"), sort_keys=True).encode())
        for path in _files_of(plan, source):
            digest.update(path.name.encode() + hashes.sha256(path).encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(plan: DataPlan, hashes: FileHashes | None = None) -> str:
    """The tokenizer's settings and the contents of what it is made from."""
    spec = plan.tokenizer
    if spec.train is not None:
        if plan.data.pretrain is None:
            raise RelayError("tokenizer.train: needs data.pretrain sources to train on")
        from model.bpe import trainer_identity

        return sources_fingerprint(plan, plan.data.pretrain.sources, hashes, seed=plan.seed, train=spec.train.model_dump(),
                                   trainer=trainer_identity())
    files = _tokenizer_inputs(plan, hashes or FileHashes())
    return hashlib.sha256(json.dumps([spec.model_dump(mode="json"), files], sort_keys=True).encode()).hexdigest()


def _prepared_tokenizer(out: Path, fingerprint: str) -> Tokenizer | None:
    """RUN/tokenizer when it was prepared from the job's current tokenizer settings and inputs."""
    marker = out / "source.json"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (ValueError, RecursionError):  # damaged: preflight names it unless the data stage is re-run, as now
        recorded = None
    if isinstance(recorded, dict) and recorded.get("fingerprint") == fingerprint:
        return Tokenizer.from_dir(out)
    return None


def tokenizer_vocabulary(plan: DataPlan, tokenizer_dir: Path, hashes: FileHashes | None = None) -> tuple[int, bool]:
    """(ids the run's tokenizer has, exact?) without preparing anything: the prepared tokenizer
    when it is current, else the one the job names; a tokenizer still to be trained counts its
    target size, not exact (a small corpus can give fewer merges). `hashes`: the run's file
    hashes, so a file the run also fingerprints is read once."""
    prepared = _prepared_tokenizer(Path(tokenizer_dir), _tokenizer_fingerprint(plan, hashes))
    if prepared is not None:
        return prepared.n_vocab, True
    spec = plan.tokenizer
    if spec.train is not None:
        return spec.train.vocab_size, False
    return _load_named_tokenizer(plan).n_vocab, True


def known_tokenizer(plan: DataPlan, tokenizer_dir: Path, hashes: FileHashes | None = None) -> Tokenizer | None:
    """The run's tokenizer where it is known without preparing anything (prepared and current,
    or named by the job); None for one still to be trained."""
    prepared = _prepared_tokenizer(Path(tokenizer_dir), _tokenizer_fingerprint(plan, hashes))
    if prepared is not None:
        return prepared
    return None if plan.tokenizer.train is not None else _load_named_tokenizer(plan)


def _load_named_tokenizer(plan: DataPlan) -> Tokenizer:
    spec = plan.tokenizer
    if spec.encoding:
        return Tokenizer.from_name(spec.encoding)
    if spec.file:
        return Tokenizer.from_file(plan.path(spec.file), spec.sha256)
    return Tokenizer.from_dir(plan.path(spec.dir))


def prepare_tokenizer(plan: DataPlan, out: Path, hashes: FileHashes | None = None) -> Tokenizer:
    """Resolve the job's tokenizer into `out` (RUN/tokenizer; trained if asked) and load it."""
    spec = plan.tokenizer
    out = Path(out)
    fingerprint = _tokenizer_fingerprint(plan, hashes)
    prepared = _prepared_tokenizer(out, fingerprint)
    if prepared is not None:
        return prepared
    if spec.train is None:
        tok = _load_named_tokenizer(plan)
    else:
        tok = Tokenizer.train(_training_text(plan, spec.train.max_chars), spec.train.vocab_size,
                              name=f"{plan.name}-bpe{spec.train.vocab_size}")
    with atomic_dir(out, durable=True) as tmp:
        tok.save(tmp)
        (tmp / "source.json").write_text(json.dumps({"fingerprint": fingerprint, "spec": spec.model_dump(mode="json")},
                                                    indent=2) + "\n")
    return Tokenizer.from_dir(out)


def _training_text(plan: DataPlan, max_chars: int | None):
    """The pretraining documents, streamed in source order (all of them, or until `max_chars`):
    BPE training reads them once, as they come."""
    from pipelines.data.pretrain import iter_documents
    from pipelines.data.sources import SourceStats

    if max_chars is None:
        yield from iter_documents(plan, SourceStats())
        return
    budget = max_chars
    for doc in iter_documents(plan, SourceStats()):
        yield doc[:budget]
        budget -= min(len(doc), budget)
        if budget <= 0:
            return


def prepare_data(plan: DataPlan, run_dir, stages: tuple[str, ...] = ("pretrain", "sft", "dpo"), *, run_blocks=None, show=None,
                 timed=None) -> dict:
    """Prepare the tokenizer and the requested data stages of `run_dir` (a RunDir); {stage: manifest}.

    `run_blocks` places the pretraining blocks' work (cluster/launch.py: Ray Data on every node;
    default: this process); `show` receives progress lines; `timed(name)`, a context manager,
    times the "tokenizer" and the "data" (the driver's start-up phases)."""
    from contextlib import nullcontext

    from pipelines.data.pretrain import prepare_pretrain
    from pipelines.data.sft import prepare_sft

    from pipelines.rundir import RunDir

    timed = timed or (lambda name: nullcontext())
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    hashes = FileHashes(run_dir.input_hashes)
    with timed("tokenizer"):
        tokenizer = prepare_tokenizer(plan, run_dir.tokenizer, hashes)
    if plan.tokenizer.train is not None and show is not None:
        from model.tokenizer import vocabulary_shortfall

        shortfall = vocabulary_shortfall(tokenizer, plan.tokenizer.train.vocab_size)
        if shortfall:
            show(f"[data] warning: tokenizer.train.vocab_size: {shortfall}")
    out: dict = {"tokenizer": tokenizer}
    with timed("data"):
        if "pretrain" in stages and plan.data.pretrain is not None:
            fp = sources_fingerprint(plan, plan.data.pretrain.sources, hashes, tokenizer=tokenizer.sha256, seed=plan.seed,
                                     val_fraction=plan.data.pretrain.val_fraction, shard_tokens=plan.data.pretrain.shard_tokens,
                                     block_bytes=plan.data.pretrain.block_bytes)
            out["pretrain"] = prepare_pretrain(plan, tokenizer, run_dir.data("pretrain"), fp, run_blocks=run_blocks, show=show)
            _check_one_window(plan, out["pretrain"]["splits"]["train"]["tokens"])
        if "sft" in stages and plan.data.sft is not None:
            seq_len = plan.sft_seq_len
            template = {"chat_template": tokenizer.chat_template_sha256} if tokenizer.chat_template is not None else {}
            fp = sources_fingerprint(plan, plan.data.sft.sources, hashes, tokenizer=tokenizer.sha256, seed=plan.seed,
                                     val_fraction=plan.data.sft.val_fraction, seq_len=seq_len, **template)
            out["sft"] = prepare_sft(plan, tokenizer, run_dir.data("sft"), fp, seq_len)
        if "dpo" in stages and plan.data.dpo is not None:
            from pipelines.data.preference import prepare_preference

            seq_len = plan.dpo_seq_len
            fp = sources_fingerprint(plan, plan.data.dpo.sources, hashes, tokenizer=tokenizer.sha256, seed=plan.seed,
                                     val_fraction=plan.data.dpo.val_fraction, seq_len=seq_len, kind="preference")
            out["dpo"] = prepare_preference(plan, tokenizer, run_dir.data("dpo"), fp, seq_len)
    hashes.save()
    return out


def _check_one_window(plan: DataPlan, train_tokens: int) -> None:
    """A training split shorter than one window would fail on rank 0 after the workers started:
    said here, at preparation, with the numbers."""
    seq_len = plan.pretrain_window
    if seq_len is None:
        return
    if train_tokens < seq_len + 1:  # a window is seq_len inputs and the next token of each as its target
        raise RelayError(f"data.pretrain: the training split holds {train_tokens} tokens, fewer than one window of {seq_len} + 1 "
                         f"(stages.pretrain.seq_len, default the model's block_size); add text or shorten the window")


def validation_warning(stage: str, train_tokens: int, val_tokens: int) -> str | None:
    """One line when validation took more than MAX_VAL_SHARE of a data stage's tokens, else None.

    Whole documents are held out, and at least one, so a corpus of a few documents can lose half
    of its text to validation. Training still works, so this is a warning, not an error: a small
    smoke-test corpus is a legitimate job, and the line says how to change it."""
    total = train_tokens + val_tokens
    if total == 0 or val_tokens <= MAX_VAL_SHARE * total:
        return None
    unit, more = ("documents", "add documents (split_by: blank_line cuts a text file into many)") if stage == "pretrain" \
        else ("conversations", "add conversations")
    return (f"data.{stage}.val_fraction: validation got {val_tokens:,} of {total:,} tokens ({val_tokens / total:.0%}), training "
            f"{train_tokens:,}; more than {MAX_VAL_SHARE:.0%} because {unit} are held out whole: {more} or set val_fraction: 0")
