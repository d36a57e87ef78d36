"""Configs of the data pipeline: tokenizer and data sections of the job file.

Owned here, beside the code that uses them, and composed into the job spec (jobs/spec.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from model.tokenizer import STANDARD_ENCODINGS
from pipelines.settings import Strict


# ---- tokenizer ---------------------------------------------------------------------------

class TrainTokenizerSpec(Strict):
    """A byte-level BPE trained on the pretraining text by the `tokenizers` library (model/bpe.py)."""

    vocab_size: int = Field(ge=512, description="full vocabulary, special tokens included")
    max_chars: int | None = Field(None, ge=1, description="at most this much pretraining text is read for training "
                                  "(default: all of it, streamed)")


class TokenizerSpec(Strict):
    """Exactly one of: a standard encoding, a .tiktoken file (+ sha256), a directory, or train."""

    encoding: str | None = None
    file: str | None = None
    sha256: str | None = None
    dir: str | None = None
    train: TrainTokenizerSpec | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value):
        if value is not None and value not in STANDARD_ENCODINGS:
            raise ValueError(f"unknown encoding {value!r}; valid: {', '.join(STANDARD_ENCODINGS)}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("encoding", "file", "dir", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of encoding, file, dir, train (got {', '.join(given) or 'none'})")
        if self.sha256 is not None and self.file is None:
            raise ValueError("sha256 applies to tokenizer.file only")
        return self


# ---- data --------------------------------------------------------------------------------

SFT_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response")


class SourceSpec(Strict):
    """One data source. `weight` scales the source's share of the training windows: they are
    drawn with probability proportional to weight x the source's windows, after packing
    (pipelines/data/loader.py, MixtureLoader); preparation keeps every document once."""

    type: Literal["text", "json", "parquet", "csv", "hub", "synthetic"]
    path: str | None = Field(None, description="file or glob (text, json, parquet, csv)")
    field: str | None = Field(None, description="text field (pretraining from json/parquet/csv/hub); default 'text'")
    split_by: Literal["file", "blank_line"] = Field("file", description="text files: one document per file or per blank-line block")
    name: str | None = Field(None, description="hub dataset name")
    config: str | None = Field(None, description="hub dataset config")
    split: str = Field("train", description="hub dataset split")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_response"] = "auto"
    fields: dict[str, str] | None = Field(None, description="instruction sources: the format's field -> the data's column, "
                                          "e.g. {instruction: instruction, input: context, output: response}")
    weight: float = Field(1.0, gt=0)
    encoding: str | None = Field(None, description="text, json and csv files: their text encoding (e.g. latin-1, cp1252); "
                                 "default UTF-8. A file with bytes invalid in it is refused, naming the first one's offset")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value):
        import codecs

        if value is None:
            return value
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}; e.g. utf-8, latin-1, cp1252") from None
        if "\n".encode(value, errors="replace") != b"\n":
            raise ValueError(f"{value!r} does not write a newline as the byte \\n (UTF-16 / UTF-32); convert the file to UTF-8")
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value, info: ValidationInfo):
        from pipelines.data.chat_formats import mapping_problem

        if value is not None:
            problem = mapping_problem(value, info.data.get("format", "auto"))
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _needs(self):
        if self.type in ("text", "json", "parquet", "csv") and not self.path:
            raise ValueError(f"a {self.type} source needs 'path'")
        if self.type == "hub" and not self.name:
            raise ValueError("a hub source needs 'name' (the dataset name on the hub)")
        return self


class PretrainDataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="documents held out for validation (by document hash)")
    shard_tokens: int = Field(1 << 26, ge=1024, description="at most this many tokens per shard file")
    block_bytes: int = Field(1 << 26, ge=4096, description="input per preparation block, the unit of work of one worker: files "
                             "are gathered, and large text / JSONL / CSV files cut at a document boundary, into blocks of about "
                             "this size, each written as its own shards (so shards do not depend on the number of workers)")
    separate_documents: bool = Field(False, description="attend within each document of a window only, positions restarting "
                                     "at each; off: attention runs across documents (the plain causal kernel)")


class SFTDataSpec(Strict):
    sources: list[SourceSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    seq_len: int | None = Field(None, ge=8, description="packed row length; default the model's block_size")
    separate_documents: bool = Field(True, description="attend within each conversation of a packed row only, positions "
                                     "restarting at each; off: later conversations see earlier ones of their row")


PREFERENCE_FORMATS = ("auto", "pairs", "hh")


class PreferenceSourceSpec(SourceSpec):
    """A source of preference pairs (pipelines/data/preference.py): `pairs` rows hold prompt + chosen +
    rejected (text or message lists), `hh` rows (Anthropic HH-RLHF) hold chosen and rejected whole
    conversations that share the prompt; auto tells them apart by the prompt field."""

    format: Literal["auto", "pairs", "hh"] = "auto"
    fields: dict[str, str] | None = Field(None, description="the format's field -> the data's column, e.g. "
                                          "{prompt: question, chosen: good, rejected: bad}")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value, info: ValidationInfo):
        from pipelines.data.preference import PREFERENCE_FIELDS

        for key in value or {}:
            if key not in PREFERENCE_FIELDS:
                raise ValueError(f"unknown key {key!r}; a preference source maps {', '.join(PREFERENCE_FIELDS)}")
        return value


class PreferenceDataSpec(Strict):
    sources: list[PreferenceSourceSpec] = Field(min_length=1)
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="pairs held out for validation (by a hash of the pair)")
    seq_len: int | None = Field(None, ge=8, description="row length of prompt + answer (one row per side, padded; longer "
                                "ones are cut at the end, counted); default the model's block_size")


Fact = Literal["city", "pet", "color", "birthplace"]
FACTS_DEFAULT = ["city", "pet", "color"]


class SyntheticSpec(Strict):
    """The offline demo world (pipelines/data/synthetic.py)."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="0 to 2**32 - 1")
    num_people: int = Field(48, ge=4)
    held_out_fraction: float = Field(0.25, gt=0, lt=1)
    mentions_per_fact: int = Field(48, ge=1, description="biographies per person in pretraining (each states all its facts, in random order and phrasing)")
    num_arithmetic: int = Field(300, ge=0)
    facts: list[Fact] = Field(default_factory=lambda: list(FACTS_DEFAULT), min_length=1,
                              description="what the pretraining biographies state: city, pet, color, birthplace")
    sft_facts: list[Fact] = Field(default_factory=lambda: list(FACTS_DEFAULT), min_length=1,
                                  description="what the instruction set and the held-out `synthetic` questions ask about")
    preference_facts: list[Fact] = Field(default_factory=lambda: list(FACTS_DEFAULT), min_length=1,
                                         description="what the DPO pairs (training people) ask about")
    held_out_preference_facts: list[Fact] = Field(default_factory=lambda: list(FACTS_DEFAULT), min_length=1,
                                                  description="what the held-out preference pairs (RUN/data/dpo/held_out_pairs.jsonl) ask about")

    @model_validator(mode="after")
    def _asked_facts_are_stated(self):
        for name in ("sft_facts", "preference_facts", "held_out_preference_facts"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a fact twice: {values}")
            unknown = [f for f in values if f not in self.facts]
            if unknown:
                raise ValueError(f"{name}: {unknown[0]!r} is not among facts {self.facts}; pretraining never states it, "
                                 "so no model could know it")
        if len(set(self.facts)) != len(self.facts):
            raise ValueError(f"facts lists a fact twice: {self.facts}")
        return self


class DataSpec(Strict):
    num_proc: int = Field(2, ge=1, description="workers preparing pretraining data at once (Ray Data tasks of one CPU, on any "
                          "node; without Ray, tiktoken threads); the shards do not depend on it")
    pretrain: PretrainDataSpec | None = None
    sft: SFTDataSpec | None = None
    dpo: PreferenceDataSpec | None = None
    synthetic: SyntheticSpec = SyntheticSpec()
