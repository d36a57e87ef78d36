"""Functions that run inside the processes of tests/distributed.py for tensor parallelism."""

from __future__ import annotations

import hashlib


def _batches(plan, seed: int, documents: bool):
    """Endless (x, y) micro-batches, the same on every rank: every layout then trains on the same
    data whatever its data-parallel size, so a data-parallel layout computes exactly what one
    process given those batches computes. Rows count up from a random token (learnable: the
    loss must fall), so the next token is the successor. With `documents`, ((x, document ids), y):
    rows packed with documents of about 6 tokens, kept apart (they cross any split of the row)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = plan.model.vocab_size
    while True:
        start = torch.randint(0, vocab, (plan.micro_batch, 1), generator=g)
        x = (start + torch.arange(plan.seq_len + 1)) % vocab  # (B, T + 1)
        if not documents:
            yield x[:, :-1], x[:, 1:]
            continue
        document_ids = (torch.rand(plan.micro_batch, plan.seq_len, generator=g) < 0.15).long().cumsum(dim=1)
        yield (x[:, :-1], document_ids), x[:, 1:]


def _exported(engine) -> dict:
    """Every exported weight as gathered on rank 0 (None elsewhere), via the engine's stream."""
    specs = engine.export_specs()
    order = list(specs)
    out = {name: tensor for name, tensor in zip(order, engine.stream_weights(order))}
    return out if engine.topology.rank == 0 else {}


def _digest(weights: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def tensor_parallel_layouts(config_kwargs: dict, layouts: list[dict], steps: int, checkpoint_dir: str, documents: bool = False) -> dict:
    """For each layout (DeepSpeed settings) in turn: the digest of its export before training
    (the initial weights, gathered), the losses of `steps` steps and the trained weights on rank 0.
    The last layout is also checkpointed half-way and resumed in a new engine, whose losses for
    the second half are returned as `resumed`."""
    import torch

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine
    from dist_workers import _plan

    torch.set_num_threads(1)
    init_distributed()
    config = GPTConfig(**config_kwargs)
    stage = {"steps": steps, "micro_batch": 2, "grad_accum": 2, "optimizer": {"grad_clip": 0.3, "warmup_steps": 2, "lr": 1e-2}}
    out: dict = {"runs": []}
    for i, deepspeed in enumerate(layouts):
        plan = _plan(config, {**stage, "deepspeed": deepspeed})
        engine = Engine(plan, init_state=None)
        initial = _exported(engine)  # a collective: every rank streams
        initial = _digest(initial) if initial else None
        batches = _batches(plan, seed=7, documents=documents)
        losses, norms = [], []
        for step in range(steps):
            values = engine.read(engine.train_step(batches))
            losses.append(values["loss"])
            norms.append(values["grad_norm"])
            if i == len(layouts) - 1 and step == steps // 2 - 1:
                engine.save(checkpoint_dir, "half", {"step": step + 1})
        trained = {name: weight.numpy() for name, weight in _exported(engine).items()}  # (tensors would cross by shared memory)
        out["runs"].append({"initial": initial, "losses": losses, "grad_norms": norms, "trained": trained,
                            "tp": engine.topology.tp, "dp": engine.topology.dp, "dp_rank": engine.topology.dp_rank})
        del engine
    resumed = Engine(plan, init_state=None)
    client = resumed.load(checkpoint_dir, "half")
    batches = _batches(plan, seed=7, documents=documents)
    for _ in range(client["step"] * plan.grad_accum):
        next(batches)
    out["resumed"] = [resumed.read(resumed.train_step(batches))["loss"] for _ in range(steps - client["step"])]
    return out


def split_layout_memory(config_kwargs: dict, layouts: list[dict]) -> list[dict]:
    """For each layout in turn, what this rank holds, measured on the live tensors of one
    optimizer step (gradients after the backward pass, weights and state after the step; ZeRO-0 in fp32, so the optimizer is torch's AdamW and holds exp_avg and
    exp_avg_sq per parameter): bytes of weights, gradients and optimizer state; and the bytes the
    forward of one micro-batch saves for the backward pass (the activations), counted by
    autograd's saved-tensor hooks, each storage once."""
    import torch

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine
    from dist_workers import _plan

    torch.set_num_threads(1)
    init_distributed()
    config = GPTConfig(**config_kwargs)
    out = []
    for deepspeed in layouts:
        plan = _plan(config, {"steps": 2, "micro_batch": 1, "deepspeed": {"zero_stage": 0, **deepspeed}})
        engine = Engine(plan, init_state=None)
        batches = _batches(plan, seed=1, documents=False)
        engine.engine.train()
        _, loss = engine._forward(*next(batches))
        engine.engine.backward(loss)
        params = [p for p in engine.engine.module.parameters()]
        gradients = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)  # before the step frees them
        engine.engine.step()
        held = {"weights": sum(p.numel() * p.element_size() for p in params), "gradients": gradients,
                "optimizer": sum(t.numel() * t.element_size() for state in engine.optimizer.state.values()
                                 for t in state.values() if torch.is_tensor(t) and t.dim() > 0)}
        seen, saved = set(), [0]

        def pack(tensor):
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                saved[0] += key[1]
            return tensor

        x, y = next(batches)
        engine.engine.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = engine._forward(x, y)
        del loss
        out.append({**held, "activations": saved[0], "layout": deepspeed})
        del engine
    return out
