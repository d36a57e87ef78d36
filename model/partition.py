"""Where a pipeline cuts the GPT: layer boundaries per stage, and what each stage computes.

The pipeline layers are those of model/pipe.py: 0 token embedding, 1 position embedding,
2 .. L+1 the blocks, L+2 the final norm, L+3 the LM head. `stage_boundaries` returns
DeepSpeed's `parts` (the first layer of every stage, then the end), which the engine imposes
on the PipelineModule and the planner reads, so both always agree.

Methods:
    compute         (default) blocks spread so the largest stage's training FLOPs are as small
                    as they can be; the embedding rides with the first stage, the norm, the LM
                    head and the loss over the vocabulary with the last. With a large
                    vocabulary the last stage gets fewer blocks, or none.
    type:BlockPipe  the same number of blocks on every stage (the first ones take any extra),
                    ignoring the embedding and the head.
    parameters      as compute, balancing parameter counts instead of FLOPs.
    uniform         the same number of layers of any kind on every stage (DeepSpeed's uniform).
Every method but uniform gives every stage at least one block, except that compute and
parameters may leave the last stage the norm and the head alone.
"""

from __future__ import annotations

from model.config import GPTConfig

PARTITION_METHODS = ("compute", "type:BlockPipe", "parameters", "uniform")
# Cross-entropy over the vocabulary, forward and backward, per logit: max, subtract, exp, sum,
# divide, and the gradient's subtract; small next to the head's matmul, counted all the same.
LOSS_FLOPS_PER_LOGIT = 8.0


def _block_params(config: GPTConfig) -> int:
    final_norm = config.n_embd * (2 if config.norm == "layernorm" and config.bias else 1)
    return (config.num_params(include_embeddings=False) - final_norm) // config.n_layer


def layer_flops(config: GPTConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token (forward + backward) of every pipeline layer: 6 x matmul
    parameters, plus 12 x width x sequence for attention in a block (as flops_per_token
    counts them). Embedding lookups and norms are counted as free; the LM head is a matmul
    over the padded vocabulary plus the loss over it."""
    block = 6.0 * _block_params(config) + 12.0 * config.n_embd * seq_len
    head = 6.0 * config.padded_vocab_size * config.n_embd + LOSS_FLOPS_PER_LOGIT * config.padded_vocab_size
    return [0.0, 0.0, *([block] * config.n_layer), 0.0, head]


def layer_params(config: GPTConfig, num_stages: int) -> list[int]:
    """Parameters each pipeline layer holds (the last stage holds its own copy of a tied head
    when the embedding and the head are on different stages)."""
    c, v = config.n_embd, config.padded_vocab_size
    final_norm = c * (2 if config.norm == "layernorm" and config.bias else 1)
    position = config.block_size * c if config.position == "learned" else 0
    head = v * c if (not config.tie_embeddings or num_stages > 1) else 0
    return [v * c, position, *([_block_params(config)] * config.n_layer), final_norm, head]


def stage_boundaries(config: GPTConfig, num_stages: int, method: str = "compute", seq_len: int | None = None,
                     fits=None) -> list[int]:
    """DeepSpeed's `parts`: parts[s] is the first pipeline layer of stage s, parts[-1] the end.

    `fits(stage, start, stop)`, when given, says whether pipeline layers start..stop-1 fit the
    memory of `stage`: the balanced cut is then the best among those where every stage fits
    (ValueError when none does)."""
    num_layers = config.n_layer + 4
    if method == "uniform":
        return _uniform(num_layers, num_stages)
    if method not in PARTITION_METHODS:
        raise ValueError(f"partition_method must be one of {', '.join(PARTITION_METHODS)}, got {method!r}")
    if num_stages > config.n_layer:
        raise ValueError(f"{num_stages} pipeline stages but the model has {config.n_layer} blocks")
    if method == "type:BlockPipe":
        base, extra = divmod(config.n_layer, num_stages)
        sizes = [base + (1 if s < extra else 0) for s in range(num_stages)]
    else:
        costs = layer_flops(config, seq_len or config.block_size) if method == "compute" else layer_params(config, num_stages)
        def allowed(stage: int, i: int, j: int) -> bool:  # blocks i..j-1 -> pipeline layers
            return fits(stage, 0 if stage == 0 else 2 + i, num_layers if stage == num_stages - 1 else 2 + j)
        sizes = _balanced_blocks(costs[2:-2], num_stages, first=sum(costs[:2]), last=sum(costs[-2:]),
                                 allowed=allowed if fits is not None else None)
    parts, start = [0], 2
    for size in sizes[:-1]:
        start += size
        parts.append(start)
    return parts + [num_layers]


def stage_flops(config: GPTConfig, parts: list[int], seq_len: int) -> list[float]:
    """Training FLOPs per token of each stage of a partition."""
    costs = layer_flops(config, seq_len)
    return [sum(costs[parts[s]:parts[s + 1]]) for s in range(len(parts) - 1)]


def _balanced_blocks(costs: list[float], num_stages: int, *, first: float, last: float, allowed=None) -> list[int]:
    """Blocks per stage, in order, minimising the largest stage cost, where the first stage also
    pays `first` and the last `last`. Every stage holds at least one block except the last,
    which may hold the head alone (when the head outweighs a block). `allowed(stage, i, j)`, if
    given, rules out putting blocks i..j-1 on a stage. Exact, by dynamic programming."""
    n, inf = len(costs), float("inf")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, i: int, j: int) -> float:  # blocks i..j-1 on `stage`
        return prefix[j] - prefix[i] + (first if stage == 0 else 0.0) + (last if stage == num_stages - 1 else 0.0)

    # best[s][j]: the smallest possible max cost of stages 0..s-1 holding blocks 0..j-1
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        is_last = s == num_stages
        for j in ([n] if is_last else range(s, n + 1)):
            for i in range(s - 1, j + 1 if is_last else j):
                if best[s - 1][i] == inf or (allowed is not None and not allowed(s - 1, i, j)):
                    continue
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    if best[num_stages][n] == inf:
        raise ValueError(f"no cut into {num_stages} stages fits")
    sizes, j = [], n
    for s in range(num_stages, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def _uniform(num_items: int, num_parts: int) -> list[int]:
    """Equal counts, the first stages taking any extra (DeepSpeed's partition_uniform)."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [p * chunk for p in range(num_parts + 1)]
    for i in range(residual):
        for p in range(i + 1, num_parts + 1):
            parts[p] += 1
    return parts


def layer_of(config: GPTConfig, gpt_name: str) -> int:
    """The pipeline layer that holds a GPT parameter (the inverse of `gpt_key`)."""
    if gpt_name.startswith("transformer.h."):
        return 2 + int(gpt_name.split(".")[2])
    for prefix, layer in (("transformer.wte.", 0), ("transformer.wpe.", 1), ("transformer.ln_f.", config.n_layer + 2),
                          ("lm_head.", config.n_layer + 3)):
        if gpt_name.startswith(prefix):
            return layer
    raise KeyError(f"not a GPT parameter name: {gpt_name}")
