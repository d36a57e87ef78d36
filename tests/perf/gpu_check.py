"""The GPU check (`make bench-gpu`): one CUDA GPU, no Ray, launched by torchrun.

On the relaygpt Engine (DeepSpeed, the code a training worker runs), with the tokens of a
fixed random bigram chain (learnable: losses fall, so precisions can be compared), it measures

  1. pretraining tokens/s and MFU of gpt2-124m and gpt2-350m in bf16 with compiled blocks,
     over --steps optimizer steps after a warm-up (the compile), loss first -> last;
  2. bf16 against fp32 (same initial weights, same batches): the loss difference per step over
     the first --agree steps of gpt2-124m;
  3. fp16 with DeepSpeed's dynamic loss scaling: loss first -> last and the final scale;
  4. peak GPU memory (max_memory_allocated) of every training case against the planner's
     estimate for the same stage (pipelines/train/memory.py);
  5. greedy generation tokens/s in bf16, one sequence and a batch of 32: relaygpt's CUDA-graph
     decoding, its eager path, and transformers' GPT2LMHeadModel.generate on the same weights
     (the ratio against the targets of issue 19, and how many greedy tokens agree).

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
               compile_blocks: bool, device: str, pool, keep_model: bool = False) -> dict:
    """Train `steps + warmup` optimizer steps; time the last `steps`; memory against the plan."""
    import torch

    from pipelines.train.engine import Engine
    from pipelines.train.memory import stage_memory
    from pipelines.train.metrics import device_peak_flops
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    settings = TrainStageSpec(steps=steps + warmup, micro_batch=micro_batch, grad_accum=grad_accum, compile=compile_blocks,
                              optimizer={"lr": 6e-4, "warmup_steps": min(20, warmup + steps // 10), "min_lr_ratio": 0.1},
                              deepspeed={"zero_stage": 1, "precision": precision})
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
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        losses.append(engine.train_step(data)["loss"])
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = plan.tokens_per_step / seconds
    peak = device_peak_flops(None)
    planned = stage_memory(plan)[0].total
    out = {"case": name, "params": config.num_params(), "precision": precision, "compiled": compile_blocks,
           "optimizer": engine.optimizer_name, "tokens_per_step": plan.tokens_per_step, "step_s": seconds,
           "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * config.flops_per_token(plan.seq_len) / peak if peak else None,
           "losses": losses, "planned_gib": planned / GIB}
    if cuda:
        out["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    if precision == "fp16":
        out["loss_scale"] = float(getattr(engine.engine.optimizer, "loss_scale", float("nan")))
    if keep_model:
        out["state"] = {k: v.detach().float().cpu() for k, v in engine.engine.module.state_dict().items()}
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


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
             "| case | params | precision | tokens/step | s/step | tokens/s | MFU | peak GiB | planned GiB | peak ÷ plan | loss first → last |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["peak_gib"] / r["planned_gib"] if r.get("peak_gib") else None
        extra = f" (loss scale {r['loss_scale']:g})" if "loss_scale" in r else ""
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.0f}M | {r['precision']}{' compiled' if r['compiled'] else ''} | "
                     f"{r['tokens_per_step']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {num(r['mfu'], '.1%')} | "
                     f"{num(r.get('peak_gib'), '.2f')} | {r['planned_gib']:.2f} | {num(ratio, '.2f')} | "
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per throughput case")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (the compile happens here)")
    parser.add_argument("--agree", type=int, default=60, help="steps of the bf16 vs fp32 comparison")
    parser.add_argument("--json", default=None, help="write every number here")
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
        models = {"tiny-a": GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
                  "tiny-b": GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=2, n_embd=64)}
        micro, accum, steps, warmup, agree_steps, compile_blocks = 2, 2, 3, 1, 12, False
        new_tokens = 8
    else:
        models = {"gpt2-124m": preset("gpt2-124m", vocab), "gpt2-350m": preset("gpt2-350m", vocab)}
        micro, accum, steps, warmup, agree_steps, compile_blocks = 16, 2, args.steps, args.warmup, args.agree, True
        new_tokens = 256
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the agreement case
    first = next(iter(models.values()))
    pool = bigram_pool(first.vocab_size, 2048 if not args.smoke else 64, first.block_size + 1, device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run: the numbers mean nothing)"
    rows = []
    for name, config in models.items():
        rows.append(train_case(name, config, precision="bf16", steps=steps, warmup=warmup, micro_batch=micro, grad_accum=accum,
                               compile_blocks=compile_blocks, device=device, pool=pool, keep_model=(config is first)))
        print(f"[gpu-check] {name} bf16: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    state = rows[0].pop("state")
    # The agreement runs: the same model, batches and initial weights, eager, bf16 then fp32.
    same = dict(steps=agree_steps, warmup=0, micro_batch=micro, grad_accum=accum, compile_blocks=False, device=device, pool=pool)
    bf16 = train_case(f"{next(iter(models))} (agreement)", first, precision="bf16", **same)
    fp32 = train_case(f"{next(iter(models))} (agreement)", first, precision="fp32", **same)
    rows += [bf16, fp32]
    agree = agreement(bf16["losses"], fp32["losses"], skip=min(10, agree_steps // 2))
    if device == "cuda":
        rows.append(train_case(f"{next(iter(models))} fp16", first, precision="fp16", **same))
    print(f"[gpu-check] bf16 vs fp32: max relative difference {agree['max_relative']:.2%}", flush=True)
    generation = [generation_case(first, state, device, batch, new_tokens) for batch in (1, 32 if not args.smoke else 4)]
    report = table(rows, agree, generation, device_name)
    print("\n" + report)
    if args.json:
        numbers = {"device": device_name, "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                   "training": [{k: v for k, v in r.items() if k != "losses"} | {"loss_first": r["losses"][0], "loss_last": r["losses"][-1]}
                                for r in rows],
                   "bf16_vs_fp32": agree, "generation": generation, "table": report}
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
