"""LoRA's point, measured: the optimizer state a rank holds when only rank-8 adapters train,
against full fine-tuning of the same model, on the same layout (CPU, 2 ranks, ZeRO-1, fp32).

Model: GPT-2 124M (12 x 768, vocab 50304; >= 100M parameters), adapters on every projection of
every block. The bytes are counted on the optimizer's live tensors after two optimizer steps
(tests/dist_workers.py: optimizer_state_bytes), not derived from parameter counts. Target:
LoRA's optimizer state per rank <= 0.1x full fine-tuning's.
"""

from dist_workers import optimizer_state_bytes
from distributed import run_distributed

MIB = 2**20
MODEL = dict(vocab_size=50304, block_size=64, n_layer=12, n_head=12, n_embd=768)


def test_lora_optimizer_state_per_rank(record):
    numbers = {}
    for name, lora in (("full", None), ("lora_r8", {"rank": 8, "alpha": 16})):
        stage = {"micro_batch": 1, "deepspeed": {"zero_stage": 1}, "lora": lora}
        ranks = run_distributed(optimizer_state_bytes, 2, MODEL, stage, 2, timeout=1200)
        numbers["params"] = ranks[0]["params"] if lora is None else numbers["params"]
        numbers[f"{name}_trainable"] = ranks[0]["trainable"]
        numbers[f"{name}_optimizer_mib_per_rank"] = "/".join(f"{r['optimizer_bytes'] / MIB:.1f}" for r in ranks)
        numbers[f"{name}_peak_rss_mib_per_rank"] = "/".join(f"{r['peak_rss'] / MIB:.0f}" for r in ranks)
        numbers[f"{name}_optimizer_bytes"] = max(r["optimizer_bytes"] for r in ranks)
    numbers["ratio"] = numbers["lora_r8_optimizer_bytes"] / numbers["full_optimizer_bytes"]
    record("lora_optimizer_state", **numbers)
    assert numbers["params"] >= 100_000_000
    assert numbers["ratio"] <= 0.1, numbers
