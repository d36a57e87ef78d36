"""The GPU check (`make bench-gpu`): one CUDA GPU, no Ray, launched by torchrun.

On the relaygpt Engine (DeepSpeed, the code a training worker runs), with the tokens of a
fixed random bigram chain (learnable: losses fall, so precisions can be compared), it measures

  1. pretraining tokens/s and MFU of gpt2-124m, gpt2-350m and gpt2-1.3b in bf16 as planned on a
     GPU (the whole model compiled, ZeRO-1), against the same GPT trained by a plain PyTorch loop
     (bf16 autocast, fused AdamW, whole-model compile) on the same shapes in the same run: the
     ratio is the headline (target >= 1.0x), over --steps optimizer steps after a warm-up;
  2. the alternatives the plan chose against: blocks compiled with DeepSpeed's chunked (Triton)
     cross entropy, and ZeRO-0 (run as ZeRO-1 on one GPU);
  3. bf16 against fp32 (same initial weights, same batches): the loss difference per step over
     the first --agree steps of the first model, and fp16 with DeepSpeed's dynamic loss scaling;
  4. peak GPU memory (max_memory_allocated) of every case against the planner's estimate for
     the same stage (pipelines/train/memory.py; target within 10 %);
  5. a torch.profiler look at a few steps: device-busy time per step against wall time, and the
     ten kernels that take the most device time;
  6. greedy generation tokens/s in bf16, one sequence and a batch of 32: relaygpt's CUDA-graph
     decoding, its eager path, and transformers' GPT2LMHeadModel.generate on the same weights
     (the ratio against the targets of issue 19, and how many greedy tokens agree).

Each case runs on its own: one that fails is a row saying so, the others still run, and --json
is rewritten after each part, so a run cut off by a time limit keeps what it measured.
It prints one markdown table (the one in docs/PERFORMANCE.md) and writes the numbers as JSON
to --json. `--smoke` runs the same code on the CPU with a tiny model in seconds (a CI test
keeps this script working on machines without a GPU); its numbers mean nothing.

    make bench-gpu        # = torchrun --standalone --nproc-per-node 1 tests/perf/gpu_check.py
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

GIB = 1024**3
BIGRAM_FANOUT = 8  # each token is followed by one of 8 fixed successors: the loss floor is ln 8


def bigram_pool(vocab_size: int, sequences: int, length: int, device, seed: int = 0):
    """`sequences` token rows of `length`, walks of a fixed random bigram chain (generated once)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab_size, (vocab_size, BIGRAM_FANOUT), generator=g)
    rows = torch.empty(sequences, length, dtype=torch.long)
    rows[:, 0] = torch.randint(0, vocab_size, (sequences,), generator=g)
    for t in range(1, length):
        pick = torch.randint(0, BIGRAM_FANOUT, (sequences,), generator=g)
        rows[:, t] = successors[rows[:, t - 1], pick]
    return rows.to(device)


def batches(pool, micro_batch: int, seed: int):
    """Endless (x, y) micro-batches drawn from the pool in a seeded order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randint(0, pool.shape[0], (micro_batch,), generator=g).to(pool.device)
        rows = pool[pick]
        yield rows[:, :-1], rows[:, 1:]


def train_case(name: str, config, *, precision: str, steps: int, warmup: int, micro_batch: int, grad_accum: int,
               compile_scope: str, device: str, pool, keep_model: bool = False, zero_stage: int = 1,
               activation_checkpointing: int = 0, log_every: int = 10) -> dict:
    """Train `steps + warmup` optimizer steps on the relaygpt Engine; time the last `steps`, reading
    the loss back every `log_every` steps as the trainer does; peak memory against the plan."""
    import torch

    from pipelines.train.engine import Engine
    from pipelines.train.memory import stage_memory
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    settings = TrainStageSpec(steps=steps + warmup, micro_batch=micro_batch, grad_accum=grad_accum, compile=compile_scope,
                              optimizer={"lr": 6e-4, "warmup_steps": min(20, warmup + steps // 10), "min_lr_ratio": 0.1},
                              deepspeed={"zero_stage": zero_stage, "precision": precision,
                                         "activation_checkpoint_interval": activation_checkpointing})
    plan = plan_training("pretrain", settings, config, world_size=1, seq_len=config.block_size, device=device,
                         data_dir=Path("."), init_model=None, seed=0)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    engine = Engine(plan, init_state=None)
    data = batches(pool, micro_batch, seed=1)
    losses, start = [], None
    for step in range(steps + warmup):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        out = engine.train_step(data)
        if step < warmup or (step + 1 - warmup) % log_every == 0 or step == steps + warmup - 1:
            losses.append(engine.read(out)["loss"])
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    out = _throughput(name, config, plan.tokens_per_step, plan.seq_len, seconds, losses, device)
    out |= {"precision": precision, "compiled": plan.compile, "loss_kernel": plan.loss_kernel, "zero_stage": zero_stage,
            "zero_stage_run": plan.deepspeed_zero_stage, "optimizer": engine.optimizer_name,
            "planned_gib": stage_memory(plan)[0].total / GIB, "notes": plan.engine_notes}
    if cuda:
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    if precision == "fp16":
        out["loss_scale"] = float(getattr(engine.engine.optimizer, "loss_scale", float("nan")))
    if keep_model:
        out["state"] = {k: v.detach().float().cpu() for k, v in engine.engine.module.state_dict().items()}
    del engine
    _release(device)
    return out


def plain_loop_case(name: str, config, *, steps: int, warmup: int, micro_batch: int, grad_accum: int, device: str, pool,
                    compile_model: bool, log_every: int = 10) -> dict:
    """The peer: the same GPT trained by a plain PyTorch loop, as a careful person writes one
    for one GPU: fp32 weights, bf16 autocast, fused AdamW with the same groups and schedule
    shape, the whole model compiled, gradients clipped to 1, the loss read every `log_every` steps."""
    import torch

    from model.gpt import GPT
    from pipelines.train.engine import param_groups

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    run = torch.compile(model) if compile_model else model
    data = batches(pool, micro_batch, seed=1)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    losses, start = [], None
    for step in range(steps + warmup):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        total = None
        for _ in range(grad_accum):
            x, y = next(data)
            with autocast:
                _, loss = run(x, labels=y)
            (loss / grad_accum).backward()
            total = loss.detach() if total is None else total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step < warmup or (step + 1 - warmup) % log_every == 0 or step == steps + warmup - 1:
            losses.append(float(total) / grad_accum)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    out = _throughput(f"{name} plain PyTorch loop", config, micro_batch * grad_accum * config.block_size, config.block_size,
                      seconds, losses, device)
    out |= {"precision": "bf16 autocast", "compiled": "model" if compile_model else "off", "loss_kernel": "compiled" if compile_model else "fp32",
            "optimizer": "AdamW (fused)"}
    if cuda:
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    del model, run, opt
    _release(device)
    return out


def _throughput(case: str, config, tokens_per_step: int, seq_len: int, seconds: float, losses: list[float], device: str) -> dict:
    from pipelines.train.metrics import device_peak_flops

    tokens_per_s = tokens_per_step / seconds
    peak = device_peak_flops(None) if device == "cuda" else None
    return {"case": case, "params": config.num_params(), "tokens_per_step": tokens_per_step, "step_s": seconds,
            "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * config.flops_per_token(seq_len) / peak if peak else None,
            "losses": losses}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _release(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # the next case compiles its own graphs


def profile_steps(config, *, micro_batch: int, grad_accum: int, device: str, pool, steps: int = 5) -> dict:
    """torch.profiler over `steps` optimizer steps of the relaygpt Engine (bf16, as planned) after
    a warm-up: device-busy time per step against wall time per step, and the ten kernels that
    take the most device time: where the time goes, before anyone changes anything."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pipelines.train.engine import Engine
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    settings = TrainStageSpec(steps=steps + 10, micro_batch=micro_batch, grad_accum=grad_accum, deepspeed={"precision": "bf16"})
    plan = plan_training("pretrain", settings, config, world_size=1, seq_len=config.block_size, device=device,
                         data_dir=Path("."), init_model=None, seed=0)
    engine, data = Engine(plan, init_state=None), batches(pool, micro_batch, seed=1)
    for _ in range(8):
        engine.train_step(data)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            out = engine.train_step(data)
        engine.read(out)
        _sync(device)
    wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.device_type.name == ("CUDA" if device == "cuda" else "CPU")]
    busy_key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    kernels = sorted(events, key=lambda e: getattr(e, busy_key), reverse=True)
    busy = sum(getattr(e, busy_key) for e in events) / 1e6 / steps if device == "cuda" else None
    del engine
    _release(device)
    return {"wall_ms_per_step": wall * 1e3, "device_busy_ms_per_step": busy * 1e3 if busy is not None else None,
            "top_kernels": [{"name": e.key[:90], "ms_per_step": getattr(e, busy_key) / 1e3 / steps, "calls_per_step": e.count / steps}
                            for e in kernels[:10]]}


def generation_case(config, state: dict, device: str, batch: int, new_tokens: int) -> dict:
    """Greedy decoding of `batch` prompts of 32 tokens, `new_tokens` new ones each, in bf16
    (fp32 on the CPU), all from the same weights:

    - relaygpt's generate on its GPU path, the CUDA graph (on the CPU the same static step
      run eagerly, so the smoke run exercises that code);
    - relaygpt's eager dynamic path (what a GPU ran before graphs, what a CPU runs);
    - transformers' GPT2LMHeadModel.generate (use_cache, no sampling, never stopping early).

    Tokens/s of each, relaygpt ÷ transformers against the target, and how many greedy tokens
    agree position by position (bf16 near-ties may part two paths late in a row)."""
    import torch

    from model.gpt import GPT

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = GPT(config, initialize=False)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    prompts = [[(7 * row + 3 * i) % config.vocab_size for i in range(32)] for row in range(batch)]
    decoder = "graph" if device == "cuda" else "static"
    ours, seconds, first_call_s = _relaygpt_greedy(model, prompts, new_tokens, decoder, device)
    eager, eager_s, _ = _relaygpt_greedy(model, prompts, new_tokens, "dynamic", device)
    theirs, theirs_s, attention = _transformers_greedy(config, state, prompts, new_tokens, device, dtype)
    produced = sum(len(row) for row in ours)
    tokens_per_s, theirs_tps = produced / seconds, sum(len(row) for row in theirs) / theirs_s
    return {"case": f"generate batch {batch}", "decoder": decoder, "tokens": produced, "seconds": seconds,
            "tokens_per_s": tokens_per_s, "first_call_s": first_call_s,
            "eager_tokens_per_s": sum(len(row) for row in eager) / eager_s,
            "transformers_tokens_per_s": theirs_tps, "transformers_attention": attention,
            "ratio_vs_transformers": tokens_per_s / theirs_tps, "target_ratio": 10.0 if batch == 1 else 3.0,  # issue 19
            "tokens_agreeing_transformers": _agreeing(ours, theirs), "tokens_agreeing_eager": _agreeing(ours, eager)}


def _timed(device: str, run):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _relaygpt_greedy(model, prompts, new_tokens: int, decoder: str, device: str):
    """(token rows, seconds, seconds of the first call). A static or graph decoder warms up on
    a whole call of the same shape (its first call captures the graph); the eager path on 8
    tokens."""
    from model.generate import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens)
    _, first_call_s = _timed(device, lambda: generate(model, prompts, params if decoder != "dynamic" else
                                                      SamplingParams(max_new_tokens=8), decoder=decoder))
    done, seconds = _timed(device, lambda: generate(model, prompts, params, decoder=decoder))
    return [c.tokens for c in done], seconds, first_call_s


def _transformers_greedy(config, state: dict, prompts, new_tokens: int, device: str, dtype):
    """(token rows, seconds, attention implementation) of GPT2LMHeadModel.generate on our weights
    (model/export.py's GPT-2 layout, built in memory: no tokenizer needed)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.export import gpt2_hf_config, gpt2_hf_weights

    # No end-of-text id: nothing may end a row early, and no logits processor touches the scores.
    hf_config = GPT2Config(**gpt2_hf_config(config), bos_token_id=None, eos_token_id=None, attn_implementation="sdpa")
    theirs = GPT2LMHeadModel(hf_config)
    missing, unexpected = theirs.load_state_dict(gpt2_hf_weights(state, config), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the embedding
        raise RuntimeError(f"GPT-2 weights do not fit transformers: missing {missing}, unexpected {unexpected}")
    theirs = theirs.to(device=device, dtype=dtype).eval()
    ids = torch.tensor(prompts, device=device)

    def run(count: int):
        with torch.inference_mode():
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                                   do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    run(8)  # warm-up
    out, seconds = _timed(device, lambda: run(new_tokens))
    return out[:, ids.size(1):].tolist(), seconds, theirs.config._attn_implementation


def _agreeing(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens equal at the same position of the same row."""
    return sum(x == y for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def agreement(a: list[float], b: list[float], skip: int) -> dict:
    """How far two loss curves of the same run in two precisions are apart, after `skip` steps."""
    pairs = list(zip(a, b))[skip:]
    relative = [abs(x - y) / abs(y) for x, y in pairs]
    return {"steps": len(pairs), "skipped": skip, "max_relative": max(relative), "mean_abs_nats": sum(abs(x - y) for x, y in pairs) / len(pairs),
            "first_last_bf16": (a[0], a[-1]), "first_last_fp32": (b[0], b[-1])}


def table(rows: list[dict], agree: dict | None, generation: list[dict], device_name: str) -> str:
    def num(value, fmt):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = [f"GPU check on {device_name}", "",
             "| case | params | precision | compile, loss | tokens/s | MFU | ÷ plain loop | peak GiB | planned GiB | peak ÷ plan | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | failed: {r['error'][:120]} |||||||||")
            continue
        ratio = r["peak_gib"] / r["planned_gib"] if r.get("peak_gib") and r.get("planned_gib") else None
        extra = f" (loss scale {r['loss_scale']:g})" if "loss_scale" in r else ""
        zero = f" ZeRO-{r['zero_stage']}" + (f" (runs {r['zero_stage_run']})" if r.get("zero_stage_run", r.get("zero_stage")) != r.get("zero_stage") else "") if "zero_stage" in r else ""
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['precision']}{zero} | {r['compiled']}, {r['loss_kernel']} | "
                     f"{r['tokens_per_s']:,.0f} | {num(r['mfu'], '.1%')} | {num(r.get('vs_plain'), '.2f')} | "
                     f"{num(r.get('peak_gib'), '.2f')} | {num(r.get('planned_gib'), '.2f')} | {num(ratio, '.2f')} | "
                     f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f}{extra} |")
    if agree:
        lines += ["", f"bf16 vs fp32, {agree['steps']} steps after the first {agree['skipped']}: max relative loss difference "
                      f"{agree['max_relative']:.2%}, mean {agree['mean_abs_nats']:.4f} nats"]
    for g in generation:
        lines.append(f"{g['case']} ({g['decoder']}): {g['tokens']} tokens in {g['seconds']:.2f} s = {g['tokens_per_s']:,.0f} tokens/s "
                     f"(first call {g['first_call_s']:.2f} s); eager {g['eager_tokens_per_s']:,.0f} tokens/s; transformers "
                     f"{g['transformers_tokens_per_s']:,.0f} tokens/s ({g['transformers_attention']}): relaygpt ÷ transformers "
                     f"{g['ratio_vs_transformers']:.1f}x (target >= {g['target_ratio']:g}x); greedy tokens agreeing: "
                     f"transformers {g['tokens_agreeing_transformers']}/{g['tokens']}, eager {g['tokens_agreeing_eager']}/{g['tokens']}")
    return "\n".join(lines)


def attempt(rows: list[dict], case: str, run) -> dict | None:
    """Run one case; a failure becomes a row that says so, and the other cases still run."""
    import traceback

    try:
        row = run()
    except Exception as exc:  # one case's failure must not cost the other measurements
        traceback.print_exc()
        row = {"case": case, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    rows.append(row)
    if "error" not in row:
        print(f"[gpu-check] {row['case']}: {row['tokens_per_s']:,.0f} tokens/s"
              + (f", MFU {row['mfu']:.1%}" if row.get("mfu") else "") + (f", {row['vs_plain']:.2f}x the plain loop" if row.get("vs_plain") else ""),
              flush=True)
    return row if "error" not in row else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per throughput case (a quarter of them from 1B parameters)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (the compile happens here)")
    parser.add_argument("--agree", type=int, default=60, help="steps of the bf16 vs fp32 comparison")
    parser.add_argument("--models", default="gpt2-124m,gpt2-350m,gpt2-1.3b", help="presets to measure against the plain loop")
    parser.add_argument("--json", default=None, help="write every number here (rewritten after each part, so a cut-off run keeps what it measured)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, measures nothing")
    args = parser.parse_args(argv)

    import os

    import torch

    from model.config import GPTConfig, preset
    from pipelines.train.distributed import init_distributed

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --smoke to check the script on the CPU", file=sys.stderr)
        return 2
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    vocab = 50257
    if args.smoke:
        models = {f"tiny-{i}": GPTConfig(vocab_size=512, block_size=64, n_layer=layers, n_head=2, n_embd=64) for i, layers in enumerate((2, 3))}
        micro, accum, steps, warmup, agree_steps, scope = 2, 2, 3, 1, 12, "off"
        new_tokens = 8
    else:
        models = {name: preset(name, vocab) for name in args.models.split(",")}
        micro, accum, steps, warmup, agree_steps, scope = 16, 2, args.steps, args.warmup, args.agree, "model"
        new_tokens = 256
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the agreement case
    name0, first = next(iter(models.items()))
    pool = bigram_pool(first.vocab_size, 2048 if not args.smoke else 64, first.block_size + 1, device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run: the numbers mean nothing)"
    numbers = {"device": device_name, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    rows: list[dict] = []
    save = lambda **parts: _save(args.json, numbers | parts, rows)  # noqa: E731
    state = None
    for name, config in models.items():
        n = steps if config.num_params() < 1e9 else max(10, steps // 4)
        shape = dict(steps=n, warmup=warmup, micro_batch=micro, grad_accum=accum, device=device, pool=pool)
        ours = attempt(rows, name, lambda: train_case(name, config, precision="bf16", compile_scope=scope, keep_model=(config is first), **shape))
        if ours is not None and config is first:
            state = ours.pop("state")
        plain = attempt(rows, f"{name} plain PyTorch loop", lambda: plain_loop_case(name, config, compile_model=scope == "model", **shape))
        if ours is not None and plain is not None:
            ours["vs_plain"] = ours["tokens_per_s"] / plain["tokens_per_s"]
        save()
    # The choices the plan makes on one GPU, measured against the alternatives on the first model:
    # the loss fused by compiling the whole model against DeepSpeed's chunked kernel (blocks compiled),
    # and ZeRO-0 (run as ZeRO-1 on one rank) against ZeRO-1.
    shape = dict(steps=steps, warmup=warmup, micro_batch=micro, grad_accum=accum, device=device, pool=pool)
    if not args.smoke:
        attempt(rows, f"{name0} blocks", lambda: train_case(f"{name0} blocks compiled", first, precision="bf16", compile_scope="blocks", **shape))
        attempt(rows, f"{name0} ZeRO-0", lambda: train_case(f"{name0} ZeRO-0", first, precision="bf16", compile_scope=scope, zero_stage=0, **shape))
    # The agreement runs: the same model, batches and initial weights, eager, bf16 then fp32, every loss read.
    same = dict(steps=agree_steps, warmup=0, micro_batch=micro, grad_accum=accum, compile_scope="off", device=device, pool=pool, log_every=1)
    bf16 = attempt(rows, f"{name0} (agreement) bf16", lambda: train_case(f"{name0} (agreement)", first, precision="bf16", **same))
    fp32 = attempt(rows, f"{name0} (agreement) fp32", lambda: train_case(f"{name0} (agreement)", first, precision="fp32", **same))
    agree = agreement(bf16["losses"], fp32["losses"], skip=min(10, agree_steps // 2)) if bf16 and fp32 else None
    if device == "cuda":
        attempt(rows, f"{name0} fp16", lambda: train_case(f"{name0} fp16", first, precision="fp16", **same))
    if agree:
        print(f"[gpu-check] bf16 vs fp32: max relative difference {agree['max_relative']:.2%}", flush=True)
    save(bf16_vs_fp32=agree)
    try:
        numbers["profile"] = profile_steps(first, micro_batch=micro, grad_accum=accum, device=device, pool=pool)
        print(f"[gpu-check] profile of {name0}: {json.dumps(numbers['profile'], indent=1)}", flush=True)
    except Exception as exc:  # the profile is a diagnosis, not a measurement
        numbers["profile"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    generation = [generation_case(first, state, device, batch, new_tokens) for batch in (1, 32 if not args.smoke else 4)] if state else []
    report = table(rows, agree, generation, device_name)
    print("\n" + report)
    save(bf16_vs_fp32=agree, generation=generation, table=report)
    return 0 if all("error" not in r for r in rows) else 1


def _save(path: str | None, numbers: dict, rows: list[dict]) -> None:
    if not path:
        return
    training = [{k: v for k, v in r.items() if k != "losses"} | ({"loss_first": r["losses"][0], "loss_last": r["losses"][-1]} if "losses" in r else {})
                for r in rows]
    Path(path).write_text(json.dumps(numbers | {"training": training}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
