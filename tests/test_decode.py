"""The decoding engines (model/decode.py): the fixed-shape step a CUDA graph replays, run
eagerly on the CPU, against the growing cache and against full recompute."""

import pytest
import torch

from helpers import ARCHITECTURES, tiny_config
from model.decode import MAX_IDLE_DECODERS, DynamicDecoder, StaticDecoder, decoder_kind, idle_decoders, static_length
from model.generate import SamplingParams, generate, generate_naive, left_padded, prepare_for_inference, stream
from model.gpt import GPT

# Left-padded inside one batch: 3, 13, 1 and 20 tokens.
PROMPTS = [[5, 17, 42], [7] * 11 + [99, 3], [250], list(range(20, 40))]


def _model(arch, seed=0, block_size=96):
    torch.manual_seed(seed)
    return GPT(tiny_config(300, block_size=block_size, **ARCHITECTURES[arch])).eval()


def _tokens(completions):
    return [c.tokens for c in completions]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_static_greedy_equals_dynamic_and_full_recompute(arch):
    model = _model(arch)
    params = SamplingParams(max_new_tokens=40)
    static = generate(model, PROMPTS, params, decoder="static")
    assert _tokens(static) == _tokens(generate(model, PROMPTS, params, decoder="dynamic"))
    assert _tokens(static) == _tokens(generate_naive(model, PROMPTS, params))
    assert all(len(c.tokens) == 40 and c.finish_reason == "length" for c in static)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_static_step_logits_equal_the_dynamic_ones(arch):
    """Prefill and every step, fp32: attending over the whole preallocated length through the
    mask gives the logits of attending over the filled prefix."""
    model = _model(arch, seed=3)
    input_ids, padding, positions = left_padded(PROMPTS, "cpu")
    dynamic, static = DynamicDecoder(model, len(PROMPTS), 40), StaticDecoder(model, len(PROMPTS), 64, graph=False)
    with torch.inference_mode():
        expected, got = (d.prefill(model, input_ids, positions, padding) for d in (dynamic, static))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        position = positions[:, -1:] + 1
        for _ in range(12):
            token = expected.argmax(dim=-1, keepdim=True)  # (B, 1)
            expected, got = dynamic.step(model, token, position), static.step(model, token, position)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            position = position + 1
    assert int(static.cache.position) == dynamic.cache.length == input_ids.size(1) + 12


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_static_step_traces_as_one_graph_without_host_reads(arch):
    """What a CUDA graph capture needs, checked on the CPU: the step traces whole (fullgraph:
    no .item(), no branch on a tensor's value, no shape that follows the position), and a
    run of the traced step advances the cache position like the eager one."""
    model = _model(arch, seed=5)
    decoder = StaticDecoder(model, len(PROMPTS), 64, graph=False)
    input_ids, padding, positions = left_padded(PROMPTS, "cpu")
    with torch.inference_mode():
        logits = decoder.prefill(model, input_ids, positions, padding)
        decoder.token.copy_(logits.argmax(dim=-1, keepdim=True))
        decoder.position_ids.copy_(positions[:, -1:] + 1)
        traced = torch.compile(lambda: decoder._step_on_buffers(model), fullgraph=True, backend="eager")
        out = traced()
    assert out.shape == (len(PROMPTS), 1, model.config.padded_vocab_size)
    assert int(decoder.cache.position) == input_ids.size(1) + 1


def test_static_stop_tokens_suppressed_ids_and_padded_vocabulary():
    model = _model("gpt2")
    free = generate(model, PROMPTS, SamplingParams(max_new_tokens=30), decoder="dynamic")
    stop = free[1].tokens[4]
    params = SamplingParams(max_new_tokens=30, stop_token_ids=(stop,), suppress_token_ids=(free[0].tokens[0],))
    static = generate(model, PROMPTS, params, decoder="static")
    assert _tokens(static) == _tokens(generate(model, PROMPTS, params, decoder="dynamic"))
    assert _tokens(static) == _tokens(generate_naive(model, PROMPTS, params))
    assert [c.finish_reason for c in static] == [c.finish_reason for c in generate_naive(model, PROMPTS, params)]
    assert all(free[0].tokens[0] not in c.tokens for c in static)
    with torch.no_grad():
        model.lm_head.weight[300:] = 10.0  # the padding rows of the vocabulary the most likely
    assert all(t < 300 for c in generate(model, PROMPTS, SamplingParams(max_new_tokens=10), decoder="static") for t in c.tokens)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_p=0.9)])
def test_seeded_sampling_is_the_same_on_the_static_path(sampling):
    model = _model("modern", seed=2)
    params = SamplingParams(max_new_tokens=25, seed=11, **sampling)
    static = generate(model, PROMPTS, params, decoder="static")
    assert _tokens(static) == _tokens(generate(model, PROMPTS, params, decoder="dynamic"))
    assert _tokens(static) == _tokens(generate(model, PROMPTS, params, decoder="static"))


def test_static_path_to_the_end_of_the_context_and_in_a_stream():
    model = _model("gpt2")
    params = SamplingParams(max_new_tokens=50)
    near_end = [list(range(90)), [3, 4]]  # 90 + 6 = the 96-token window: the cache is capped there
    static = generate(model, near_end, params, decoder="static")
    assert _tokens(static) == _tokens(generate(model, near_end, params, decoder="dynamic"))
    assert static[0].tokens == generate_naive(model, near_end[:1], params)[0].tokens and len(static[0].tokens) == 6
    assert list(stream(model, PROMPTS[1], params, decoder="static")) == generate(model, [PROMPTS[1]], params)[0].tokens


@pytest.mark.parametrize("kernel", ["column-major", "onednn"])
def test_static_path_after_prepare_for_inference(kernel):
    model = _model("modern", seed=4)
    expected = _tokens(generate(model, PROMPTS, SamplingParams(max_new_tokens=20)))
    prepare_for_inference(model, kernel=kernel)
    assert _tokens(generate(model, PROMPTS, SamplingParams(max_new_tokens=20), decoder="static")) == expected


def test_static_decoders_are_reused_by_shape_and_their_number_is_bounded():
    model = _model("gpt2", block_size=64)
    params = SamplingParams(max_new_tokens=10)
    expected = {n: _tokens(generate_naive(model, PROMPTS[:n], params)) for n in (1, 2, 3, 4)}
    idle = idle_decoders(model)
    assert _tokens(generate(model, PROMPTS[:2], params, decoder="static")) == expected[2]
    first = idle.decoders[(2, 32, False)]  # 13 + 10 positions: a cache of 32
    assert _tokens(generate(model, PROMPTS[:2], params, decoder="static")) == expected[2]
    assert idle.decoders[(2, 32, False)] is first  # the same cache, reset, gives the same tokens
    for n in (1, 3, 4, 2):
        assert _tokens(generate(model, PROMPTS[:n], params, decoder="static")) == expected[n]
    assert len(idle.decoders) == MAX_IDLE_DECODERS and idle.decoders.popitem()[0] == (2, 32, False)
    steps = stream(model, PROMPTS[0], params, decoder="static")
    next(steps)
    assert (1, 16, False) not in idle.decoders  # in use: taken out
    steps.close()  # a caller that stops reading gives it back
    assert (1, 16, False) in idle.decoders
    model.to(torch.float64)  # new weight tensors: what was kept was made for the old ones
    generate(model, PROMPTS[:1], params, decoder="static")
    assert list(idle.decoders) == [(1, 16, False)] and idle.decoders[(1, 16, False)].cache.k.dtype == torch.float64


def test_one_place_picks_the_engine():
    model = _model("gpt2")
    assert decoder_kind(model) == "dynamic" and decoder_kind(model, "static") == "static"
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        generate(model, PROMPTS, SamplingParams(max_new_tokens=2), decoder="graph")
    with pytest.raises(ValueError, match="decoder 'fast'"):
        generate(model, PROMPTS, SamplingParams(max_new_tokens=2), decoder="fast")
    assert [static_length(n, 96) for n in (1, 23, 32, 33, 90)] == [1, 32, 32, 64, 96]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_cuda_graph_gives_the_eager_tokens(arch):
    model = _model(arch).cuda()
    params = SamplingParams(max_new_tokens=30)
    assert decoder_kind(model) == "graph"
    eager = _tokens(generate(model, PROMPTS, params, decoder="dynamic"))
    assert _tokens(generate(model, PROMPTS, params)) == eager
    graph = idle_decoders(model).decoders[(len(PROMPTS), 64, True)].graph
    assert _tokens(generate(model, PROMPTS, params)) == eager  # replayed, not captured again
    assert idle_decoders(model).decoders[(len(PROMPTS), 64, True)].graph is graph
    assert list(stream(model, PROMPTS[2], params)) == eager[2]


def test_rows_and_chat_decode_through_the_one_choice(monkeypatch, gpt2_tokenizer):
    """The generation workers (rows.complete_rows) and chat (ChatSession, via stream) pick no
    engine of their own: whatever open_decoder's choice gives, they get."""
    from model import decode
    from pipelines.generation.chat import ChatSession
    from pipelines.generation.rows import complete_rows

    torch.manual_seed(0)
    model = GPT(tiny_config(gpt2_tokenizer.n_vocab, block_size=64)).eval()
    rows = [{"prompt": "To be, or not"}, {"prompt": "Now is the winter of our discontent"}]
    params = SamplingParams(max_new_tokens=6)
    expected = complete_rows(model, gpt2_tokenizer, rows, params, chat=False, batch_size=2)
    expected_reply = "".join(ChatSession(model, gpt2_tokenizer, params=params).reply("hello"))
    assert not idle_decoders(model).decoders  # the CPU's choice: the dynamic engine, nothing kept
    monkeypatch.setattr(decode, "decoder_kind", lambda model, requested="auto": "static")  # a GPU's, less the graph
    assert complete_rows(model, gpt2_tokenizer, rows, params, chat=False, batch_size=2) == expected
    assert "".join(ChatSession(model, gpt2_tokenizer, params=params).reply("hello")) == expected_reply
    assert {key[0] for key in idle_decoders(model).decoders} == {1, 2}  # the batch of rows and the chat
