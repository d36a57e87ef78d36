"""KV-cache generation against full recompute, batching against single prompts, sampling."""

import pytest
import torch

from helpers import ARCHITECTURES, tiny_config
from model.errors import ConfigError
from model.generate import SamplingParams, generate, generate_naive, stream
from model.gpt import GPT

PROMPTS = [[5, 17, 42], [7] * 11 + [99, 3], [250], list(range(20, 40))]


def _model(arch, seed=0):
    torch.manual_seed(seed)
    return GPT(tiny_config(300, block_size=96, **ARCHITECTURES[arch]))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_greedy_kv_cache_equals_full_recompute(arch):
    model = _model(arch)
    params = SamplingParams(max_new_tokens=40)
    fast = generate(model, PROMPTS, params)
    slow = generate_naive(model, PROMPTS, params)
    assert [c.tokens for c in fast] == [c.tokens for c in slow]
    assert all(len(c.tokens) == 40 and c.finish_reason == "length" for c in fast)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_prompt_alone_equals_inside_the_batch(arch):
    model = _model(arch, seed=1)
    params = SamplingParams(max_new_tokens=30)
    batch = generate(model, PROMPTS, params)
    for prompt, inside in zip(PROMPTS, batch):
        assert generate(model, [prompt], params)[0].tokens == inside.tokens


def test_stop_tokens_end_rows_independently():
    model = _model("gpt2")
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=30))
    stop = free[1].tokens[4]  # the 5th token of the second prompt's free run
    stopped = generate(model, PROMPTS, SamplingParams(max_new_tokens=30, stop_token_ids=(stop,)))
    row = stopped[1]
    assert row.finish_reason == "stop" and row.tokens == free[1].tokens[: free[1].tokens.index(stop)]
    for free_row, got in zip(free, stopped):
        if stop not in free_row.tokens:
            assert got.tokens == free_row.tokens and got.finish_reason == "length"


def test_context_window_ends_generation_with_length():
    model = _model("gpt2")
    out = generate(model, [list(range(90))], SamplingParams(max_new_tokens=50))[0]
    assert len(out.tokens) == 96 - 90 and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    model = _model("modern")
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=5, seed=123)
    a = generate(model, PROMPTS, params)
    b = generate(model, PROMPTS, params)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=20))
    top1 = generate(model, PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.7, top_k=1, seed=5))
    assert [c.tokens for c in top1] == [c.tokens for c in greedy]
    tiny_p = generate(model, PROMPTS, SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=9))
    assert [c.tokens for c in tiny_p] == [c.tokens for c in greedy]


def test_top_k_keeps_only_the_k_most_likely():
    from model.generate import sample_next

    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, SamplingParams(temperature=2.0, top_k=2), gen)) for _ in range(200)}
    assert seen == {1, 2}
    seen = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.9), gen)) for _ in range(300)}
    assert seen <= {1, 2, 4} and 1 in seen


def test_padded_vocabulary_rows_are_never_generated():
    model = _model("gpt2")
    assert model.config.padded_vocab_size > model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight[300:] = 10.0  # make the padding rows the most likely
    out = generate(model, PROMPTS, SamplingParams(max_new_tokens=10))
    assert all(t < 300 for c in out for t in c.tokens)


def test_stream_yields_what_generate_returns():
    model = _model("gpt2")
    params = SamplingParams(max_new_tokens=25)
    assert list(stream(model, PROMPTS[1], params)) == generate(model, [PROMPTS[1]], params)[0].tokens
    assert model.training  # the caller's mode is restored


def test_bad_sampling_values_are_config_errors():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=0)):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


@pytest.mark.parametrize("kernel", ["row-major", "column-major", "onednn"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_inference_kernel_keeps_logits_and_tokens(arch, kernel):
    from model.generate import prepare_for_inference

    model = _model(arch)
    ids = torch.arange(24).view(2, 12) * 11 % 300
    with torch.no_grad():
        logits_before, _ = model(ids)
    expected = generate(model, PROMPTS, SamplingParams(max_new_tokens=30))
    prepare_for_inference(model, kernel=kernel)
    assert model.linear_kernel == kernel
    with torch.no_grad():
        logits_after, _ = model(ids)
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-5, atol=1e-5)
    assert [c.tokens for c in generate(model, PROMPTS, SamplingParams(max_new_tokens=30))] == [c.tokens for c in expected]
    if kernel == "column-major":
        assert not model.transformer.h[0].attn.c_attn.weight.is_contiguous()
    if kernel == "onednn":
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "PackedLinear"
    if model.config.tie_embeddings:  # the embedding and the head still share one weight
        assert model.lm_head.weight is model.transformer.wte.weight


def test_a_kernel_is_chosen_only_when_clearly_faster_and_packed_layers_refuse_training():
    from model.generate import PackedLinear, clearly_fastest

    assert clearly_fastest({"row-major": 1.0, "column-major": 0.9, "onednn": 0.85}) == "row-major"  # near ties: keep
    assert clearly_fastest({"row-major": 1.0, "column-major": 0.7, "onednn": 0.65}) == "column-major"
    assert clearly_fastest({"row-major": 1.0, "column-major": 0.7, "onednn": 0.3}) == "onednn"
    assert clearly_fastest({"row-major": 1.0, "column-major": 1.2}) == "row-major"  # no oneDNN in this build
    layer = PackedLinear(torch.nn.Linear(16, 8), keep_weight=False)
    x = torch.randn(2, 16)
    with torch.no_grad():
        layer(x)
    with pytest.raises(RuntimeError, match="for inference"):
        layer(x)  # a packed layer has no backward: refuse instead of giving wrong gradients


def test_auto_measures_and_picks_one_of_the_kernels():
    from model.generate import LINEAR_KERNELS, fastest_linear_kernel, prepare_for_inference

    model = _model(next(iter(ARCHITECTURES)))
    assert fastest_linear_kernel(model.lm_head) in LINEAR_KERNELS
    prepare_for_inference(model)
    assert model.linear_kernel in LINEAR_KERNELS and not model.training
    with pytest.raises(ValueError, match="kernel 'fast'"):
        prepare_for_inference(_model(next(iter(ARCHITECTURES))), kernel="fast")


def test_the_generation_device_is_the_gpu_when_there_is_one():
    """pick_device: auto takes a visible GPU in bf16 (fp32 where it has no bf16), else the CPU;
    asking for cuda without one is a clear error."""
    import torch

    from model.errors import RelayError
    from pipelines.generation.worker import pick_device

    assert pick_device("auto", cuda_available=False) == ("cpu", torch.float32)
    assert pick_device("auto", cuda_available=True, bf16_supported=True) == ("cuda", torch.bfloat16)
    assert pick_device("auto", cuda_available=True, bf16_supported=False) == ("cuda", torch.float32)
    assert pick_device("cpu", cuda_available=True) == ("cpu", torch.float32)
    with pytest.raises(RelayError, match="--device cuda: this process sees no CUDA device"):
        pick_device("cuda", cuda_available=False)
    assert pick_device() == (("cuda", pick_device()[1]) if torch.cuda.is_available() else ("cpu", torch.float32))
