"""A catalogue of bad inputs: every case is refused with exit 2, one line naming the field,
file or row, no traceback, and nothing written or deleted outside the run directory.

The cases are generated from the job schema and from issue 20's list (numbers that are not
finite or out of range, paths of the wrong kind, addresses, YAML that would expand without
end, damaged run directories, task files, DeepSpeed keys, data that is not honest text) and
the earlier rounds' (unknown keys with a did-you-mean). They run in this process through the
CLI's own `main` (no subprocess, no Ray: `relaygpt run` stops at preflight, and a case that got
past it would fail loudly on the patched stage runner), so the whole file takes seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

import cluster.cli as cli
import cluster.driver
import cluster.runtime
import cluster.torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "jobs" / "tiny-assistant.yaml").read_text())
TINY["output_dir"] = "runs"
RUN = Path("runs") / "tiny-assistant" / "default"


@dataclass
class Case:
    """One bad input: `argv` after the command word's job file is filled in (`{job}`, `{dir}`),
    files to write first (path -> text, bytes or None for a directory), needles of the line."""

    id: str
    argv: list[str]
    needles: list[str]
    files: dict[str, object] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    usage: bool = False  # an argparse error: its usage line comes before the one line of the error


def _job(**edits) -> str:
    """tiny-assistant with dotted-path edits applied, as YAML."""
    job = yaml.safe_load(yaml.safe_dump(TINY))
    for path, value in edits.items():
        node, keys = job, path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return yaml.safe_dump(job, sort_keys=False)


def _set(*assignments: str, command: str = "run") -> list[str]:
    return [command, "{job}", *[x for a in assignments for x in ("--set", a)]]


# ---- numbers: finite and in range ----------------------------------------------------------

STAGE_FLOATS = ["optimizer.lr", "optimizer.min_lr_ratio", "optimizer.weight_decay", "optimizer.eps", "optimizer.grad_clip", "peak_tflops"]
OTHER_FLOATS = ["cluster.cpus_per_worker", "cluster.gpus_per_worker", "cluster.price_per_gpu_hour", "cluster.price_per_core_hour",
                "data.pretrain.val_fraction", "data.sft.val_fraction", "data.synthetic.held_out_fraction",
                "data.pretrain.sources.0.weight", "data.sft.sources.0.weight",
                "stages.eval.temperature", "stages.eval.cpus_per_worker", "stages.eval.gpus_per_worker"]
FLOATS = [f"stages.{s}.{f}" for s in ("pretrain", "sft") for f in STAGE_FLOATS] + OTHER_FLOATS

STAGE_INTS = ["steps", "micro_batch", "grad_accum", "eval_every", "eval_batches", "checkpoint_every", "keep_last", "log_every",
              "optimizer.warmup_steps", "deepspeed.pipeline_stages", "deepspeed.activation_checkpoint_interval"]
OTHER_INTS = ["cluster.num_workers", "data.num_proc", "data.pretrain.shard_tokens", "data.pretrain.block_bytes", "data.sft.seq_len",
              "data.synthetic.num_people", "data.synthetic.mentions_per_fact", "stages.eval.workers", "stages.eval.batch_size",
              "stages.eval.limit"]
INTS = [f"stages.{s}.{f}" for s in ("pretrain", "sft") for f in STAGE_INTS] + OTHER_INTS


def _shown(path: str) -> str:
    """How a problem names a field: list items as [i]."""
    parts = path.split(".")
    return ".".join(parts).replace(".sources.0.", ".sources[0].")


def number_cases() -> list[Case]:
    cases = []
    for path in FLOATS:
        for value in (".inf", "-.inf", ".nan"):
            cases.append(Case(f"{path}={value}", _set(f"{path}={value}"), [f"--set {path}={value}: {_shown(path)}"]))
    for path in INTS:
        for value in ("-1", "many"):
            cases.append(Case(f"{path}={value}", _set(f"{path}={value}"), [f"{_shown(path)}: "]))
    for path, value in [("seed", "-1"), ("seed", str(2**32)), ("seed", str(2**70)), ("seed", "1.5"), ("data.synthetic.seed", "-1"),
                        ("data.synthetic.seed", str(2**70))]:
        cases.append(Case(f"{path}={value}", _set(f"{path}={value}"), [f"{path}: "]))
    for stage in ("pretrain", "sft"):
        for betas in ("[1.5, 0.95]", "[-0.1, 0.95]", "[0.9, 1.0]", "[0.9]", "[.inf, 0.9]"):
            cases.append(Case(f"{stage} betas {betas}", _set(f"stages.{stage}.optimizer.betas={betas}"),
                              [f"stages.{stage}.optimizer.betas"]))
        cases.append(Case(f"{stage} warmup past steps", _set(f"stages.{stage}.optimizer.warmup_steps=5000"),
                          [f"stages.{stage}: optimizer.warmup_steps (5000) is more than steps"]))
    cases.append(Case("warmup past the steps a token budget gives",
                      _set("stages.pretrain.steps=null", "stages.pretrain.tokens=4096"),
                      ["stages.pretrain.optimizer.warmup_steps: 30 is more than the stage's 2 steps"]))
    return cases


# ---- unknown keys (the earlier rounds): a typo of every field names the nearest one ---------------

def typo_cases() -> list[Case]:
    sections = {
        "": ["seed", "output_dir", "tokenizer", "cluster", "stages"],
        "stages.pretrain.": ["micro_batch", "grad_accum", "eval_every", "checkpoint_every", "keep_last", "log_every", "compile"],
        "stages.sft.optimizer.": ["min_lr_ratio", "warmup_steps", "schedule", "weight_decay", "grad_clip"],
        "stages.pretrain.deepspeed.": ["zero_stage", "offload_optimizer", "pipeline_stages", "partition_method", "precision"],
        "cluster.": ["num_workers", "cpus_per_worker", "gpus_per_worker", "placement", "max_failures", "launcher"],
        "data.": ["num_proc"], "data.pretrain.": ["val_fraction", "shard_tokens", "block_bytes", "separate_documents"],
        "data.synthetic.": ["num_people", "mentions_per_fact", "num_arithmetic"],
        "stages.eval.": ["models", "tasks", "workers", "batch_size", "temperature", "system_prompt"],
    }
    cases = []
    for prefix, names in sections.items():
        for name in names:
            typo = name[:-1] + ("x" if name[-1] != "x" else "y")
            cases.append(Case(f"typo {prefix}{typo}", _set(f"{prefix}{typo}=1"), [f"{prefix}{typo}: unknown key", f"did you mean '{name}'"]))
    return cases


# ---- names, paths, addresses -----------------------------------------------------------------

LONG = "a" * 300


def path_cases() -> list[Case]:
    cases = [
        Case("300-character job name", _set(f"name={LONG}"), ["name: ", "(300 characters)", "at most 100"]),
        Case("job name with a slash", _set("name=a/b"), ["name: 'a/b' cannot name a directory"]),
        Case("job name ..", _set("name=.."), ["name: '..' cannot name a directory"]),
        Case("job name starting with -", _set("name=-x"), ["name: '-x' cannot name a directory"]),
        Case("300-character run id", ["run", "{job}", "--run-id", LONG], ["--run-id: ", "(300 characters)"]),
        Case("run id ../x", ["run", "{job}", "--run-id", "../x"], ["--run-id: '../x' is not a valid run id"]),
        Case("run id a/b", ["plan", "{job}", "--run-id", "a/b"], ["--run-id: 'a/b' is not a valid run id"]),
        Case("run id .hidden", ["plan", "{job}", "--run-id", ".hidden"], ["--run-id: '.hidden' is not a valid run id"]),
        Case("--out is a file", ["run", "{job}", "--out", "{dir}/afile"], ["--out: ", "afile is a file, not a directory"],
             files={"afile": "mine"}),
        Case("--out under a file", ["plan", "{job}", "--out", "{dir}/afile/sub"], ["--out: ", "afile is a file, not a directory"],
             files={"afile": "mine"}),
        Case("output_dir is a file", _set("output_dir=afile"), ["output_dir: ", "afile is a file, not a directory"], files={"afile": "x"}),
        Case("--out under /proc", ["run", "{job}", "--out", "/proc/self/relaygpt"], ["--out: ", "lies under /proc"]),
        Case("output_dir under /proc", _set("output_dir=/proc/relaygpt"), ["output_dir: ", "lies under /proc"]),
        Case("--out under /sys", ["plan", "{job}", "--out", "/sys/relaygpt"], ["--out: ", "lies under /sys"]),
        Case("--out with a 300-character name", ["run", "{job}", "--out", "{dir}/" + LONG], ["--out: ", "300 bytes long"]),
        Case("data prepare --out is a file", ["data", "prepare", "{job}", "--out", "{dir}/afile"], ["--out: ", "is a file"],
             files={"afile": "x"}),
        Case("eval --out is a file", ["eval", "{dir}/nomodel", "--task", "synthetic", "--out", "{dir}/afile"],
             ["--out: ", "afile is a file, not a directory"], files={"afile": "x"}),
        Case("eval --out under /proc", ["eval", "{dir}/nomodel", "--task", "synthetic", "--out", "/proc/x"], ["--out: ", "under /proc"]),
        Case("tokenizer.dir is a text file", _set("tokenizer={dir: notes.txt}"), ["tokenizer.dir: ", "notes.txt is a file"],
             files={"notes.txt": "not a tokenizer"}),
        Case("tokenizer.file is a directory", _set("tokenizer={file: somedir}"), ["tokenizer.file: ", "somedir is a directory"],
             files={"somedir": None}),
        Case("torchrun --until-step 0", ["torchrun", "{job}", "--stage", "pretrain", "--until-step", "0"],
             ["--until-step", "step 0 is before the first step"], usage=True),
        Case("torchrun --until-step -1", ["torchrun", "{job}", "--stage", "pretrain", "--until-step", "-1"],
             ["--until-step", "expected a step number (1 or more), got -1"], usage=True),
        Case("torchrun --until-step x", ["torchrun", "{job}", "--stage", "pretrain", "--until-step", "x"],
             ["--until-step", "expected a step number"], usage=True),
        Case("torchrun --run-dir is a file", ["torchrun", "{job}", "--stage", "pretrain", "--run-dir", "{dir}/afile"],
             ["--run-dir: ", "is a file"], files={"afile": "x"}),
    ]
    for address, needle in [("127.0.0.1:99999", "Port out of range"), ("http://[::1", "Invalid IPv6 URL"), ("headnode", "needs a host and a port"),
                            (":6379", "needs a host and a port"), ("http://head:8265", "uses the scheme 'http'")]:
        cases.append(Case(f"cluster.address {address}", _set(f"cluster.address={address}"), [f"cluster.address: '{address}'", needle]))
        cases.append(Case(f"run --address {address}", ["run", "{job}", "--address", address], [f"--address: '{address}'", needle]))
    for address, needle in [("127.0.0.1:99999", "Port out of range"), ("http://[::1", "Invalid IPv6 URL"), ("ray://head:10001", "scheme 'ray'"),
                            ("http://head", "needs a host and a port")]:
        cases.append(Case(f"submit --address {address}", ["submit", "{job}", "--address", address], [f"--address: '{address}'", needle]))
        for action in ("list", "status", "logs", "stop"):
            argv = ["jobs", action] + ([] if action == "list" else ["raysubmit_1"]) + ["--address", address]
            cases.append(Case(f"jobs {action} --address {address}", argv, [f"--address: '{address}'", needle]))
    cases.append(Case("generate --address", ["generate", "{dir}/m", "--prompts", "{dir}/p.jsonl", "--out", "{dir}/o.jsonl",
                                             "--workers", "2", "--address", "http://[::1"], ["--address: 'http://[::1'"]))
    return cases


# ---- YAML that would not end: aliases, nesting, size ------------------------------------------

def _bomb(levels: int = 7) -> str:
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def yaml_cases() -> list[Case]:
    job = _job()
    bomb = _bomb()
    deep = "name: x\nseed: " + "[" * 5000 + "]" * 5000 + "\n"
    return [
        Case("alias bomb as the name", ["plan", "{job}"], ["job.yaml:", "expands to more than 100000 values"],
             files={"job.yaml": bomb + job.replace("name: tiny-assistant", "name: *l6")}),
        Case("alias bomb as an integer field", ["run", "{job}"], ["job.yaml:", "expands to more than 100000 values"],
             files={"job.yaml": bomb + job.replace("seed: 1234", "seed: *l6")}),
        Case("alias bomb inside deepspeed.extra", ["run", "{job}"], ["job.yaml:", "expands to more than 100000 values"],
             files={"job.yaml": bomb + job.replace("zero_stage: 1\n", "zero_stage: 1\n      extra: {a: *l6}\n", 1)}),
        Case("alias bomb in --set", _set("seed=[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                                         "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                                         "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"),
             ["--set seed", "expands to more than 100000 values"]),
        Case("YAML nested 5000 deep", ["run", "{job}"], ["job.yaml:2: nested more than 64 levels deep"], files={"job.yaml": deep}),
        Case("YAML nested 65 deep", ["plan", "{job}"], ["nested more than 64 levels deep"],
             files={"job.yaml": "name: x\nseed: " + "[" * 65 + "]" * 65 + "\n"}),
        Case("a 5 MB job file", ["plan", "{job}"], ["job.yaml: ", "more than a job file may hold"],
             files={"job.yaml": job + "#" * (5 << 20) + "\n"}),
        Case("repeated key", ["run", "{job}"], ["job.yaml:3: key 'seed' is repeated (first at line 2)"],
             files={"job.yaml": "name: x\nseed: 1\nseed: 2\n"}),
        Case("invalid YAML", ["run", "{job}"], ["job.yaml:3: invalid YAML"], files={"job.yaml": "name: x\nstages: [unclosed\n"}),
        Case("job file is a directory", ["plan", "{dir}/adir"], ["adir: is a directory; give the job file itself"], files={"adir": None}),
        Case("job file not UTF-8", ["plan", "{job}"], ["job.yaml: not UTF-8 text"], files={"job.yaml": b"name: caf\xe9\n"}),
        Case("job file a list", ["plan", "{job}"], ["job.yaml: a job file is a YAML mapping"], files={"job.yaml": "- a\n- b\n"}),
        Case("job file missing", ["plan", "{dir}/nothere.yaml"], ["nothere.yaml: job file does not exist"]),
    ]


# ---- DeepSpeed: its own config keys -----------------------------------------------------------

def deepspeed_cases() -> list[Case]:
    cases = []
    for stage in ("pretrain", "sft"):
        where = f"stages.{stage}.deepspeed.extra"
        for key, value, needles in [
            ("gradient_clippin", "1.0", ["gradient_clippin: not a DeepSpeed config key", "did you mean 'gradient_clipping'"]),
            ("wall_clock_breakdwn", "true", ["not a DeepSpeed config key", "did you mean 'wall_clock_breakdown'"]),
            ("steps_per_prin", "10", ["did you mean 'steps_per_print'"]),
            ("zero_optimization.overlap_com", "true", ["zero_optimization.overlap_com: not a key of DeepSpeed's zero_optimization",
                                                      "did you mean 'overlap_comm'"]),
            ("zero_optimization.reduce_bucket_size", "-5", ["zero_optimization.reduce_bucket_size: "]),
            ("zero_optimization", "fast", ["zero_optimization: a DeepSpeed section, expected a mapping"]),
            ("tensorboard.enabld", "true", ["tensorboard.enabld: not a key", "did you mean 'enabled'"]),
        ]:
            cases.append(Case(f"{stage} extra {key}", _set(f"{where}.{key}={value}"), [f"{where}.{key.split('.')[0]}", *needles]))
        cases.append(Case(f"{stage} extra contradicts grad_accum", _set(f"{where}.gradient_accumulation_steps=3"),
                          [f"{where}.gradient_accumulation_steps: 3 contradicts"]))
    return cases


# ---- eval task files -------------------------------------------------------------------------

ROWS = '{"input": "2+2", "target": "4"}\n{"input": "3+3", "target": "6"}\n'


def task_cases() -> list[Case]:
    cases = []
    for name, body, needles in [
        ("unknown placeholder", 'prompt: "Q: {inputt}"', ["prompt: unknown placeholder {inputt}", "only placeholder is {input}"]),
        ("unbalanced brace", 'prompt: "Q: {input"', ["prompt: expected '}' before end of string"]),
        ("stray closing brace", 'prompt: "Q: {input} }"', ["prompt: Single '}'"]),
        ("empty placeholder", 'prompt: "Q: {}"', ["prompt: unknown placeholder {}"]),
        ("shots: many", "shots: many", ["shots: expected a whole number >= 0, got 'many'"]),
        ("shots: -3", "shots: -3", ["shots: expected a whole number >= 0, got -3"]),
        ("shots: true", "shots: true", ["shots: expected a whole number"]),
        ("stop: 5", "stop: 5", ["stop: expected a list of non-empty strings", "got 5"]),
        ("stop with an empty string", 'stop: [""]', ["stop: expected a list of non-empty strings"]),
        ("max_new_tokens: 0", "max_new_tokens: 0", ["max_new_tokens: expected a whole number >= 1"]),
        ("style: poem", "style: poem", ["style: expected completion or chat"]),
        ("prompt a list", "prompt: [a]", ["prompt: expected text"]),
        ("metric unknown", "metric: bleu", ["metric must be one of"]),
        ("unknown key", "shotz: 2", ["unknown key(s) shotz"]),
    ]:
        text = f"name: t\nsource: {{file: rows.jsonl}}\n{body}\n"
        cases.append(Case(f"task {name}", _set("stages.eval.tasks=[task.yaml]"), ["stages.eval.tasks[0]", "task.yaml", *needles],
                          files={"task.yaml": text, "rows.jsonl": ROWS}))
    cases.append(Case("task data file missing", _set("stages.eval.tasks=[task.yaml]"), ["task.yaml", "data file", "does not exist"],
                      files={"task.yaml": "name: t\nsource: {file: none.jsonl}\n"}))
    cases.append(Case("task data malformed", _set("stages.eval.tasks=[task.yaml]"), ["rows.jsonl:2: malformed JSON line"],
                      files={"task.yaml": "name: t\nsource: {file: rows.jsonl}\n", "rows.jsonl": '{"input": "a", "target": "b"}\n{oops\n'}))
    cases.append(Case("task data not UTF-8", _set("stages.eval.tasks=[task.yaml]"), ["rows.jsonl: not UTF-8 at byte 14"],
                      files={"task.yaml": "name: t\nsource: {file: rows.jsonl}\n", "rows.jsonl": b'{"input": "caf\xe9"}\n'}))
    cases.append(Case("task data nested too deep", _set("stages.eval.tasks=[task.yaml]"), ["rows.json: JSON nested too deep"],
                      files={"task.yaml": "name: t\nsource: {file: rows.json}\n", "rows.json": "[" * 100000}))
    return cases


# ---- a run directory left damaged -------------------------------------------------------------

def run_dir_cases() -> list[Case]:
    cases = []
    for stage in ("pretrain", "sft"):
        for name, content in [("stage.json", "{bad"), ("stage.json", "[1, 2]"), ("metrics.jsonl", '{"step": 1}\n{oops\n')]:
            cases.append(Case(f"{stage}/{name} damaged ({content[:6]})", ["run", "{job}", "--resume"],
                              [f"{stage}/{name}", "damaged", f"--from-stage {stage}", f"delete {{dir}}/{RUN}/{stage}"],
                              files={f"{RUN}/{stage}/{name}": content}))
        cases.append(Case(f"{stage}/checkpoints is a file", ["run", "{job}"], [f"{stage}/checkpoints: is a file where relaygpt keeps a dir"],
                          files={f"{RUN}/{stage}/checkpoints": "x"}))
        cases.append(Case(f"{stage}/stage.json is a directory", ["run", "{job}"], [f"{stage}/stage.json: is a directory"],
                          files={f"{RUN}/{stage}/stage.json": None}))
    cases += [
        Case("tokenizer/source.json damaged", ["run", "{job}"], ["tokenizer/source.json: damaged", "--from-stage data"],
             files={f"{RUN}/tokenizer/source.json": "{"}),
        Case("logs/run.log is a directory", ["run", "{job}"], ["logs/run.log: is a directory where relaygpt keeps a file"],
             files={f"{RUN}/logs/run.log": None}),
        Case("logs is a file", ["run", "{job}"], ["logs: is a file where relaygpt keeps a dir"], files={f"{RUN}/logs": "x"}),
        Case("tokenizer is a file", ["run", "{job}"], ["tokenizer: is a file"], files={f"{RUN}/tokenizer": "x"}),
        Case("job.yaml is a directory", ["run", "{job}"], ["job.yaml: is a directory"], files={f"{RUN}/job.yaml": None}),
        Case("metrics.jsonl not UTF-8", ["run", "{job}", "--resume"], ["pretrain/metrics.jsonl: damaged (not UTF-8"],
             files={f"{RUN}/pretrain/metrics.jsonl": b'{"step": 1}\n\xff\xfe\n'}),
    ]
    return cases


# ---- data: honest text, rows that teach something ----------------------------------------------

def _data_job(sources: list[dict], stage: str = "pretrain") -> str:
    job = {"name": "d", "output_dir": "runs", "tokenizer": {"encoding": "gpt2"}, "model": {"preset": "tiny", "block_size": 64},
           "data": {"num_proc": 1, stage: {"val_fraction": 0.0, "sources": sources}}, "cluster": {"launcher": "local"}}
    return yaml.safe_dump(job)


def _sft_rows(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


def data_cases() -> list[Case]:
    prepare = ["data", "prepare", "{job}"]
    text = lambda path, **kw: [{"type": "text", "path": path, **kw}]  # noqa: E731
    cases = [
        Case("latin-1 text read as UTF-8", prepare, ["bad.txt: not UTF-8 text (byte 0xe9 at offset 3)", "set encoding:"],
             files={"job.yaml": _data_job(text("bad.txt")), "bad.txt": b"caf\xe9 au lait\n"}),
        Case("random bytes", prepare, ["rnd.bin: a binary file, not text (a NUL byte at offset 2)"],
             files={"job.yaml": _data_job(text("rnd.bin")), "rnd.bin": b"\x8f\x01\x00\xff\xfe" * 50}),
        Case("invalid UTF-8 deep in a file", prepare, ["big.txt: not UTF-8 text (byte 0xff at offset 3000000)"],
             files={"job.yaml": _data_job(text("big.txt", split_by="blank_line")), "big.txt": b"word " * 600000 + b"\xff\n"}),
        Case("a cut-off character at the end", prepare, ["cut.txt: not UTF-8 text (byte 0xc3 at offset 5)"],
             files={"job.yaml": _data_job(text("cut.txt")), "cut.txt": b"hello\xc3"}),
        Case("UTF-8 read as ascii", prepare, ["u.txt: not ascii text (byte 0xc3 at offset 3)", "not ascii either"],
             files={"job.yaml": _data_job(text("u.txt", encoding="ascii")), "u.txt": "caf\u00e9\n".encode()}),
        Case("unknown encoding", prepare, ["data.pretrain.sources[0].encoding", "unknown text encoding 'latin-9x'"],
             files={"job.yaml": _data_job(text("ok.txt", encoding="latin-9x")), "ok.txt": "ok\n"}),
        Case("utf-16 encoding", prepare, ["data.pretrain.sources[0].encoding", "does not write a newline as the byte"],
             files={"job.yaml": _data_job(text("ok.txt", encoding="utf-16")), "ok.txt": "ok\n"}),
        Case("json not UTF-8", prepare, ["rows.jsonl: not UTF-8 text (byte 0xe9"],
             files={"job.yaml": _data_job([{"type": "json", "path": "rows.jsonl"}]), "rows.jsonl": b'{"text": "caf\xe9"}\n'}),
        Case("csv not UTF-8", prepare, ["rows.csv: not UTF-8 text (byte 0xe9"],
             files={"job.yaml": _data_job([{"type": "csv", "path": "rows.csv"}]), "rows.csv": b"text\ncaf\xe9\n"}),
    ]
    short = yaml.safe_load(_data_job(text("tiny.txt")))
    short["stages"] = {"pretrain": {"steps": 1, "micro_batch": 1}}
    cases.append(Case("a corpus shorter than one window", prepare, ["data.pretrain: the training split holds", "fewer than one window of 64"],
                      files={"job.yaml": yaml.safe_dump(short), "tiny.txt": "just a few words\n"}))
    sft = lambda: [{"type": "json", "path": "chat.jsonl"}]  # noqa: E731
    for name, rows, needles in [
        ("empty assistant message", ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}'],
         ["chat.jsonl:1", "the assistant turn (turn 1) is empty"]),
        ("blank user message", ['{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "hello"}]}'],
         ["chat.jsonl:1", "the user turn (turn 0) is empty"]),
        ("empty sharegpt turns", ['{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}]}'],
         ["chat.jsonl:1", "the user turn (turn 0) is empty"]),
        ("empty alpaca output", ['{"instruction": "say hi", "input": "", "output": ""}'], ["chat.jsonl:1", "assistant turn"]),
        ("empty prompt/response on row 2", ['{"prompt": "a", "response": "b"}', '{"prompt": "", "response": "b"}'],
         ["chat.jsonl:2", "the user turn (turn 0) is empty"]),
    ]:
        cases.append(Case(f"sft {name}", prepare, needles, files={"job.yaml": _data_job(sft(), "sft"), "chat.jsonl": _sft_rows(*rows)}))
    return cases


def dpo_cases() -> list[Case]:
    """Preference pairs that teach nothing or cannot be paired (named by file:line), and DPO settings."""
    import json

    prepare, pair = ["data", "prepare", "{job}"], {"prompt": "Where does Kai live?", "chosen": "Kelmar", "rejected": "Carsk"}
    hh = lambda chosen, rejected: {"chosen": chosen, "rejected": rejected}  # noqa: E731
    rows = {
        "missing rejected": ({k: v for k, v in pair.items() if k != "rejected"}, "p.jsonl:2: no 'rejected' in this pair"),
        "rejected null": ({**pair, "rejected": None}, "p.jsonl:2: no 'rejected' in this pair"),
        "identical sides": ({**pair, "rejected": "Kelmar"}, "p.jsonl:2: chosen and rejected are identical"),
        "hh prompts differ": (hh("\n\nHuman: Where does Kai live?\n\nAssistant: Kelmar",
                                 "\n\nHuman: Where does Ana live?\n\nAssistant: Carsk"),
                              "p.jsonl:2: the prompt differs between chosen and rejected (from turn 0)"),
        "hh side without an answer": (hh([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
                                         [{"role": "user", "content": "Hi"}]),
                                      "p.jsonl:2: the rejected conversation does not end with an assistant turn"),
        "answer is a user turn": ({**pair, "chosen": [{"role": "user", "content": "x"}]}, "p.jsonl:2: chosen must be one assistant answer"),
    }
    cases = []
    for name, (row, needle) in rows.items():
        first = pair if "prompt" in row or "hh" not in name else hh(*[f"\n\nHuman: Hi\n\nAssistant: {x}" for x in "ab"])
        files = {"job.yaml": _data_job([{"type": "json", "path": "p.jsonl"}], stage="dpo"),
                 "p.jsonl": json.dumps(first) + "\n" + json.dumps(row) + "\n"}
        cases.append(Case(f"dpo pair: {name}", prepare, [needle], files=files))
    cases.append(Case("dpo fields: unknown key", prepare, ["data.dpo.sources[0].fields.answer: unknown key 'answer'"],
                      files={"job.yaml": _data_job([{"type": "json", "path": "p.jsonl", "fields": {"answer": "a"}}], stage="dpo"),
                             "p.jsonl": json.dumps(pair) + "\n"}))
    job = _job(**{"data.dpo": {"sources": [{"type": "synthetic"}]}, "stages.dpo": {"steps": 10, "micro_batch": 4}})
    for assignment, needle in [("stages.dpo.beta=0", "stages.dpo.beta: 0.0 must be a finite number above 0"),
                               ("stages.dpo.beta=-0.5", "stages.dpo.beta: -0.5 must be"),
                               ("stages.dpo.beta=.nan", "stages.dpo.beta: Input should be a finite number"),
                               ("stages.dpo.loss=kto", "stages.dpo.loss: Input should be 'sigmoid' or 'ipo'"),
                               ("stages.dpo.label_smoothing=0.5", "stages.dpo.label_smoothing: 0.5 is outside [0, 0.5)"),
                               ("stages.dpo.seq_len=64", "stages.dpo.seq_len: dpo rows are made at data.dpo.seq_len"),
                               ("data.dpo.seq_len=4096", "data.dpo.seq_len: 4096 exceeds the model's block_size 128")]:
        cases.append(Case(f"dpo setting {assignment}", _set(assignment), [needle], files={"job.yaml": job}))
    cases.append(Case("dpo label smoothing with ipo", _set("stages.dpo.loss=ipo", "stages.dpo.label_smoothing=0.1"),
                      ["stages.dpo: label_smoothing applies to loss sigmoid"], files={"job.yaml": job}))
    cases.append(Case("dpo on a pipeline", _set("stages.dpo.deepspeed.pipeline_stages=2", "stages.dpo.deepspeed.zero_stage=1"),
                      ["stages.dpo.deepspeed.pipeline_stages: DPO needs each row's log-probability"], files={"job.yaml": job}))
    cases.append(Case("eval of dpo without a dpo stage", _set("stages.eval.models=[assistant, dpo]"),
                      ["stages.eval.models[1]: 'dpo' is the DPO export, but the job has no dpo stage"]))
    cases.append(Case("dpo without data.dpo", _set("data.dpo=null"), ["stages.dpo: needs a data.dpo section"], files={"job.yaml": job}))
    for assignment, needle in [
            ("data.synthetic.held_out_preference_facts=[birthplace]",
             "data.synthetic: held_out_preference_facts: 'birthplace' is not among facts ['city', 'pet', 'color']"),
            ("data.synthetic.sft_facts=[city, city]", "data.synthetic: sft_facts lists a fact twice"),
            ("data.synthetic.facts=[city, age]", "data.synthetic.facts[1]: Input should be 'city', 'pet', 'color' or 'birthplace'")]:
        cases.append(Case(f"synthetic {assignment}", _set(assignment), [needle], files={"job.yaml": job}))
    return cases


ALL = (number_cases() + typo_cases() + path_cases() + yaml_cases() + deepspeed_cases() + task_cases() + run_dir_cases() + data_cases()
       + dpo_cases())


# ---- the check --------------------------------------------------------------------------------

def _write(root: Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under `root` but those inside `skip` (the run directories): kind, size, mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            if here / name == skip:
                continue
            stat = (here / name).lstat()
            out[str((here / name).relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return out


@pytest.fixture
def no_stages(monkeypatch):
    """Neither Ray nor a stage may start: every case must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input got past preflight: a stage or Ray was started")

    monkeypatch.setattr(cluster.runtime, "ray_session", refuse)
    monkeypatch.setattr(cluster.driver, "_run_stages", refuse)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_is_one_line_exit_2(case: Case, tmp_path, capsys, no_stages):
    files = {"job.yaml": _job(), **case.files}
    _write(tmp_path, files)
    if case.setup:
        case.setup(tmp_path)
    argv = [a.replace("{job}", str(tmp_path / "job.yaml")).replace("{dir}", str(tmp_path)) for a in case.argv]
    before = _snapshot(tmp_path, tmp_path / "runs")
    rc = _main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    if case.usage:  # argparse: its usage (wrapped over lines), then the one line of the error
        assert lines[0].startswith("usage:") and ": error: argument " in lines[-1] and sum(": error:" in x for x in lines) == 1, err
    else:
        assert len(lines) == 1 and lines[0].startswith(("relaygpt: error: ", "relaygpt worker: error: ")), err
    for needle in case.needles:
        assert needle.replace("{dir}", str(tmp_path)) in lines[-1], lines[-1]
    assert _snapshot(tmp_path, tmp_path / "runs") == before, "something outside the run directory was written or deleted"


def _main(argv: list[str]) -> int:
    """The CLI's `main` (or the torchrun worker's), its status whether returned or raised by argparse."""
    entry = cluster.torchrun.main if argv[0] == "torchrun" else cli.main
    try:
        return entry(argv[1:] if argv[0] == "torchrun" else argv)
    except SystemExit as exc:
        return exc.code


def test_the_catalogue_is_large():
    assert len(ALL) >= 200 and len({c.id for c in ALL}) == len(ALL)


def test_a_symlink_loop_reads_each_file_once(tmp_path):
    """`**` through a link to its own folder reaches one file 41 times; it is read once."""
    from jobs.plan import data_plan
    from jobs.spec import load_job
    from pipelines.data.sources import _files

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one document\n")
    (tmp_path / "corpus" / "loop").symlink_to(".")
    (tmp_path / "job.yaml").write_text(_data_job([{"type": "text", "path": "corpus/**/*.txt"}]))
    job = load_job(tmp_path / "job.yaml")
    assert [p.name for p in _files(data_plan(job), job.data.pretrain.sources[0])] == ["a.txt"]


def test_latin1_text_is_read_with_its_encoding(tmp_path):
    from jobs.plan import data_plan
    from jobs.spec import load_job
    from pipelines.data.prepare import prepare_data
    from pipelines.rundir import RunDir

    (tmp_path / "fr.txt").write_bytes("Le café est très bon.\n".encode("latin-1") * 50)
    (tmp_path / "job.yaml").write_text(_data_job([{"type": "text", "path": "fr.txt", "encoding": "latin-1"}]))
    job = load_job(tmp_path / "job.yaml")
    out = prepare_data(data_plan(job), RunDir(job.run_dir()), stages=("pretrain",))
    assert out["pretrain"]["stats"]["replaced_bytes"] == 0 and out["pretrain"]["stats"]["documents"] == 1
