"""Follow an object through a small demo-like `relaygpt run` and count its hand-overs between modules.

    python tests/scripts/handovers.py job|plan [WORK_DIR]

Runs jobs/tiny-assistant.yaml shrunk to seconds (one worker, a few steps, a small world) through
cluster/driver.py:run_job under sys.setprofile, and looks at the first 400 calls and returns of
the project's own functions (cluster, jobs, pipelines, model) that carry the followed object:

    job   the JobSpec given to run_job (by identity)
    plan  the resolved plans: RunPlan, TrainPlan, EvalPlan and DataPlan (where it exists)

An event carries the object when it is one of the called function's arguments (a call; not
`self`: a method of the object is the object used, not handed on, and so is what such a method
returns), or the
returned value or a direct member of a returned tuple, list or dict (a return). A hand-over is
an event whose two sides lie in different modules: a call hands the object from the nearest
project frame of the caller to the callee, a return from the callee back to that frame. A
hand-over goes back up a layer when a call hands it to a module of a higher layer than the
caller's (model < pipelines < jobs < cluster): code below handing it back to code above.
Generator frames are left out (see GENERATORS). Prints one JSON line: events, hand-overs, modules, back_up (and the first few of each kind).
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

LAYERS = {"model": 0, "pipelines": 1, "jobs": 2, "cluster": 3}
LIMIT = 400
# A generator's frame is entered each time its consumer asks for the next item: that is the consumer
# pulling values, not the object handed on (it was handed when the generator was made), so such
# frames are left out (else BPE training reading the pretraining text counts model -> pipelines).
GENERATORS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
OVERRIDES = ["data.num_proc=1", "data.synthetic.num_people=8", "data.synthetic.mentions_per_fact=2",
             "data.synthetic.num_arithmetic=10", "tokenizer.train.vocab_size=512", "cluster.num_workers=1",
             "stages.pretrain.steps=2", "stages.pretrain.optimizer.warmup_steps=0", "stages.sft.optimizer.warmup_steps=0", "stages.pretrain.micro_batch=2", "stages.pretrain.eval_every=2",
             "stages.pretrain.checkpoint_every=2", "stages.pretrain.log_every=1", "stages.sft.steps=2",
             "stages.sft.micro_batch=2", "stages.sft.eval_every=2", "stages.sft.checkpoint_every=2", "stages.sft.log_every=1",
             "stages.eval.workers=1", "stages.eval.limit=2"]


class Follower:
    def __init__(self, root: Path, carries) -> None:
        self.root, self.carries = str(root) + "/", carries
        self.events: list[tuple[str, str, str]] = []  # (kind, from module, to module)
        self.lock = threading.Lock()

    def module(self, frame) -> str | None:
        name = frame.f_code.co_filename
        if not name.startswith(self.root):
            return None
        parts = Path(name[len(self.root):]).with_suffix("").parts
        return ".".join(parts).removesuffix(".__init__") if parts and parts[0] in LAYERS else None

    def caller(self, frame) -> str | None:
        frame = frame.f_back
        while frame is not None and self.module(frame) is None:
            frame = frame.f_back
        return None if frame is None else self.module(frame)

    def __call__(self, frame, event, arg):
        if event not in ("call", "return") or len(self.events) >= LIMIT or frame.f_code.co_flags & GENERATORS:
            return
        here = self.module(frame)
        if here is None:
            return
        if event == "call":
            code = frame.f_code
            count = code.co_argcount + code.co_kwonlyargcount
            names = code.co_varnames[:count]
            values = [frame.f_locals.get(n) for n in (names[1:] if names[:1] == ("self",) else names)]  # a method of the object: used, not handed
        else:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self" and self.carries(frame.f_locals.get("self")):
                return  # a method of the object (RunPlan.stage) returning a part of it: the object used, not handed
            values = [arg, *(arg if isinstance(arg, (tuple, list)) else arg.values() if isinstance(arg, dict) else ())]
        if not any(self.carries(v) for v in values):
            return
        there = self.caller(frame)
        with self.lock:
            if len(self.events) < LIMIT:
                self.events.append((event, there, here) if event == "call" else (event, here, there))

    def report(self) -> dict:
        handed = [(kind, a, b) for kind, a, b in self.events if a is not None and b is not None and a != b]
        back_up = [(a, b) for kind, a, b in handed if kind == "call" and LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
        modules = sorted({m for _, a, b in self.events for m in (a, b) if m is not None})
        return {"events": len(self.events), "handovers": len(handed), "distinct_handovers": len({(a, b) for _, a, b in handed}),
                "modules": len(modules), "back_up": len(back_up),
                "module_list": modules, "pairs": dict(Counter(f"{kind} {a} -> {b}" for kind, a, b in handed).most_common()), "back_up_first": [f"{a} -> {b}" for a, b in back_up[:10]],
                "below_jobs": sorted({m for m in modules if LAYERS[m.split(".")[0]] < LAYERS["jobs"]})}


def main(what: str, work: str | None) -> None:
    import cluster
    from cluster.driver import RunOptions, run_job
    from jobs.spec import load_job
    from pipelines.rundir import RunDir

    root = Path(cluster.__file__).resolve().parents[1]
    work_dir = Path(work or tempfile.mkdtemp(prefix="handovers-"))
    job = load_job(root / "jobs" / "tiny-assistant.yaml", OVERRIDES + [f"output_dir={work_dir}"])
    if what == "job":
        carries = lambda value: value is job
    else:
        from pipelines.eval.settings import EvalPlan
        from pipelines.train.plan import RunPlan, TrainPlan

        kinds = [RunPlan, TrainPlan, EvalPlan]
        try:
            from pipelines.data.data_plan import DataPlan

            kinds.append(DataPlan)
        except ImportError:  # a checkout from before the DataPlan
            pass
        kinds = tuple(kinds)
        carries = lambda value: isinstance(value, kinds)
    follower = Follower(root, carries)
    threading.setprofile(follower)
    sys.setprofile(follower)
    try:
        run_job(job, RunDir(job.run_dir()), RunOptions(show=lambda line: None, progress=False))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    print(json.dumps({"follow": what, "root": str(root), **follower.report()}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
