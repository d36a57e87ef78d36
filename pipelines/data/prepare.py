"""`relaygpt data prepare`: the tokenizer and every data stage of a job, each cached.

    RUN/tokenizer/     the run's tokenizer (standard, file, directory or trained BPE)
    RUN/data/pretrain  token shards + manifest
    RUN/data/sft       packed rows + loss masks + manifest

A stage whose inputs (files' contents, source settings, tokenizer) have the same fingerprint
as its manifest records is not redone; any change re-prepares it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.errors import RelayError
from model.atomic import atomic_dir
from model.tokenizer import Tokenizer
from pipelines.data.shards import sha256_of

PREP_VERSION = 1  # bump when the on-disk format or the processing changes


def _files_of(job, source) -> list[Path]:
    from pipelines.data.sources import _files

    return _files(job, source) if source.type in ("text", "json", "parquet", "csv") else []


def sources_fingerprint(job, sources, **extra) -> str:
    """sha256 of everything that decides a stage's output."""
    digest = hashlib.sha256(json.dumps({"version": PREP_VERSION, **extra}, sort_keys=True, default=str).encode())
    for source in sources:
        digest.update(json.dumps(source.model_dump(mode="json"), sort_keys=True).encode())
        if source.type == "synthetic":
            digest.update(json.dumps(job.data.synthetic.model_dump(mode="json"), sort_keys=True).encode())
        for path in _files_of(job, source):
            digest.update(path.name.encode() + sha256_of(path).encode())
    return digest.hexdigest()


def _tokenizer_fingerprint(job) -> str:
    spec = job.tokenizer
    if spec.train is not None:
        if job.data.pretrain is None:
            raise RelayError("tokenizer.train: needs data.pretrain sources to train on")
        return sources_fingerprint(job, job.data.pretrain.sources, seed=job.seed, train=spec.train.model_dump())
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _prepared_tokenizer(job, out: Path) -> Tokenizer | None:
    """RUN/tokenizer when it was prepared from the job's current tokenizer settings and inputs."""
    marker = out / "source.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == _tokenizer_fingerprint(job):
        return Tokenizer.from_dir(out)
    return None


def tokenizer_vocabulary(job, tokenizer_dir: Path) -> tuple[int, bool]:
    """(ids the run's tokenizer has, exact?) without preparing anything: the prepared tokenizer
    when it is current, else the one the job names; a tokenizer still to be trained counts its
    target size, not exact (a small corpus can give fewer merges)."""
    prepared = _prepared_tokenizer(job, Path(tokenizer_dir))
    if prepared is not None:
        return prepared.n_vocab, True
    spec = job.tokenizer
    if spec.train is not None:
        return spec.train.vocab_size, False
    return _load_named_tokenizer(job).n_vocab, True


def _load_named_tokenizer(job) -> Tokenizer:
    spec = job.tokenizer
    if spec.encoding:
        return Tokenizer.from_name(spec.encoding)
    if spec.file:
        return Tokenizer.from_file(job.path(spec.file), spec.sha256)
    return Tokenizer.from_dir(job.path(spec.dir))


def prepare_tokenizer(job, out: Path) -> Tokenizer:
    """Resolve the job's tokenizer into `out` (RUN/tokenizer; trained if asked) and load it."""
    spec = job.tokenizer
    out = Path(out)
    prepared = _prepared_tokenizer(job, out)
    if prepared is not None:
        return prepared
    if spec.train is None:
        tok = _load_named_tokenizer(job)
    else:
        from pipelines.data.pretrain import collect_documents
        from pipelines.data.sources import SourceStats

        budget, texts = spec.train.max_chars, []
        for doc in collect_documents(job, SourceStats()):
            texts.append(doc[:budget])
            budget -= len(texts[-1])
            if budget <= 0:
                break
        tok = Tokenizer.train(texts, spec.train.vocab_size, name=f"{job.name}-bpe{spec.train.vocab_size}")
    with atomic_dir(out) as tmp:
        tok.save(tmp)
        (tmp / "source.json").write_text(json.dumps({"fingerprint": _tokenizer_fingerprint(job), "spec": spec.model_dump(mode="json")},
                                                    indent=2) + "\n")
    return Tokenizer.from_dir(out)


def prepare_data(job, run_dir, stages: tuple[str, ...] = ("pretrain", "sft")) -> dict:
    """Prepare the tokenizer and the requested data stages of `run_dir` (a RunDir); {stage: manifest}."""
    from pipelines.data.pretrain import prepare_pretrain
    from pipelines.data.sft import prepare_sft

    from pipelines.rundir import RunDir

    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    tokenizer = prepare_tokenizer(job, run_dir.tokenizer)
    out: dict = {"tokenizer": tokenizer}
    if "pretrain" in stages and job.data.pretrain is not None:
        fp = sources_fingerprint(job, job.data.pretrain.sources, tokenizer=tokenizer.sha256, seed=job.seed,
                                 val_fraction=job.data.pretrain.val_fraction, shard_tokens=job.data.pretrain.shard_tokens)
        out["pretrain"] = prepare_pretrain(job, tokenizer, run_dir.data("pretrain"), fp)
    if "sft" in stages and job.data.sft is not None:
        seq_len = sft_seq_len(job)
        fp = sources_fingerprint(job, job.data.sft.sources, tokenizer=tokenizer.sha256, seed=job.seed,
                                 val_fraction=job.data.sft.val_fraction, seq_len=seq_len)
        out["sft"] = prepare_sft(job, tokenizer, run_dir.data("sft"), fp, seq_len)
    return out


def sft_seq_len(job) -> int:
    """Length of a packed SFT row: data.sft.seq_len, default the model's context."""
    return job.data.sft.seq_len or job.model.block_size
