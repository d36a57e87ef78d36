"""Memory per rank of the split layouts (issue 23), measured on the live tensors of real engines
under gloo on 2 processes (tests/tp_workers.py: split_layout_memory):

1. Tensor parallel 2 vs 1 on GPT-2 124M (ZeRO-0, fp32): weights + gradients + AdamW state one
   rank holds after a step. Target: <= 0.6x (only norms and position embeddings stay whole).
2. Sequence parallel 2 vs 1 at 4096 tokens (a 4-layer, 512-wide model; activations scale with
   tokens x width x layers, not with the parameter count): the bytes one micro-batch's forward
   saves for the backward pass on a rank. Target: <= 0.6x.
"""

from distributed import run_distributed
from tp_workers import split_layout_memory

MIB = 2**20


def test_tensor_parallel_memory(record):
    model = dict(vocab_size=50304, block_size=128, n_layer=12, n_head=12, n_embd=768)
    one, two = run_distributed(split_layout_memory, 2, model, [{}, {"tensor_parallel": 2}], timeout=1800)[0]
    held = {name: sum(r[k] for k in ("weights", "gradients", "optimizer")) for name, r in (("tp1", one), ("tp2", two))}
    record("tp_memory", params_m=124.4, tp1_mib=held["tp1"] / MIB, tp2_mib=held["tp2"] / MIB, ratio=held["tp2"] / held["tp1"],
           tp1_activations_mib=one["activations"] / MIB, tp2_activations_mib=two["activations"] / MIB)
    assert held["tp2"] <= 0.6 * held["tp1"]


def test_sequence_parallel_memory(record):
    model = dict(vocab_size=4096, block_size=4096, n_layer=4, n_head=8, n_embd=512, position="rope")
    one, two = run_distributed(split_layout_memory, 2, model, [{}, {"sequence_parallel": 2}], timeout=1800)[0]
    record("sp_memory", seq_len=4096, sp1_activations_mib=one["activations"] / MIB, sp2_activations_mib=two["activations"] / MIB,
           ratio=two["activations"] / one["activations"])
    assert two["activations"] <= 0.6 * one["activations"]
