"""Hugging Face interop beyond GPT-2: the Llama family, tokenizer files, the chat template.

A model with RoPE, RMSNorm and SwiGLU (grouped-query attention and an untied head allowed)
is a `LlamaForCausalLM`: our fused q/k/v and gate/up projections are cut into Llama's
separate ones, and the rotation convention is the same (the two halves of each head rotated
together, inverse frequencies theta^(-2i/d)). Every export writes the unpadded vocabulary:
the embedding and head rows past the tokenizer's ids (padding to a multiple of 64 for
speed) are not tokens, so they are dropped on the way out and zero rows are put back on
the way in.

Tokenizer files: vocab.json + merges.txt (GPT-2's layout) and a tokenizer.json for
`AutoTokenizer` (byte-level BPE, the tiktoken pattern as its pre-tokenizer, the special
tokens registered as such), and in tokenizer_config.json a `chat_template` that renders a
conversation to exactly the ids model/chat.py gives it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import GPTConfig
from model.errors import RelayError
from model.chat_template import CHAT_TEMPLATE
from model.tokenizer import EOT, Tokenizer

def tokenizer_files(tokenizer: Tokenizer, context: int) -> dict[str, str]:
    """{file name: text} of the tokenizer of an export: vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json (with the chat template when the tokenizer has the chat tokens) and
    special_tokens_map.json."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as FastTokenizer

    from model.bpe import gpt2_files_from_ranks

    vocab, merges = gpt2_files_from_ranks(tokenizer.mergeable_ranks, tokenizer.special_tokens)
    # The special tokens sit in the model's vocabulary at their ids (below the merged tokens in
    # an imported Llama 3 tokenizer, above them in ours) and are then registered as special.
    fast = FastTokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    if tokenizer.normalizer is not None:
        fast.normalizer = getattr(normalizers, tokenizer.normalizer)()
    for token, _ in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]):
        fast.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    for token, idx in tokenizer.special_tokens.items():
        if fast.token_to_id(token) != idx:
            raise RelayError(f"tokenizer: special token {token} would get id {fast.token_to_id(token)} in tokenizer.json, not {idx}")
    chat = all(t in tokenizer.special_tokens for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context, "clean_up_tokenization_spaces": False,
        "bos_token": EOT, "eos_token": "<|end|>" if chat else EOT, "unk_token": None, "pad_token": EOT,
        "add_bos_token": False, "add_eos_token": False,
    }
    if tokenizer.chat_template is not None:  # the imported model's own template and its tokens
        config.update(tokenizer.chat_template.tokens, chat_template=tokenizer.chat_template.source)
    elif chat:
        config["chat_template"] = CHAT_TEMPLATE
    specials = {"bos_token": config["bos_token"], "eos_token": config["eos_token"], "pad_token": config["pad_token"],
                "additional_special_tokens": sorted(t for t in tokenizer.special_tokens if t != EOT)}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": fast.to_str(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }


# ---- the Llama family ---------------------------------------------------------------------

def llama_incompatibilities(config: GPTConfig) -> list[str]:
    """Why `config` is not a Llama-family model (empty when it is)."""
    needs = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
    out = [f"model.{k} is {getattr(config, k)!r} (Llama needs {v!r})" for k, v in needs.items() if getattr(config, k) != v]
    if config.bias and not config.attn_qkv_bias:
        out.append("model.qkv_bias is false where model.bias is true (Llama has biases everywhere or nowhere, Qwen2 on q/k/v only)")
    return out


def llama_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """config.json of a Llama-family export: Qwen2 where only q/k/v have biases, Llama otherwise."""
    qwen2 = config.attn_qkv_bias and not config.bias
    out = {
        "model_type": "qwen2" if qwen2 else "llama",
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": _eos_ids(tokenizer),
        "torch_dtype": "float32",
        "relaygpt": {"vocab_size": config.vocab_size, "tokenizer": {**tokenizer.identity, "pat_str": tokenizer.pat_str}},
    }
    if qwen2:
        out["use_sliding_window"] = False
    else:
        out["attention_bias"] = out["mlp_bias"] = config.bias
    if config.rope_scaling:
        out["rope_scaling"] = dict(config.rope_scaling)
    return out


def _eos_ids(tokenizer: Tokenizer):
    """config.json's eos_token_id: the ends of an assistant turn under the model's own chat
    template (a list where there are several), else relaygpt's <|end|>."""
    if tokenizer.chat_template is not None:
        stops = list(tokenizer.chat_template.stop_ids(tokenizer)) or [tokenizer.eot_id]
        return stops[0] if len(stops) == 1 else stops
    return tokenizer.special_tokens.get("<|end|>", tokenizer.eot_id)


def llama_weights(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our GPT weights under the Llama family's names (the recipe read backwards: fused q/k/v
    and gate/up cut apart), the vocabulary unpadded."""
    q, kv, hidden = config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.mlp_hidden
    cuts = {3: [q, kv, kv], 2: [hidden, hidden]}
    out = {}
    for name, (sources, vocabulary) in llama_recipe(config).items():
        tensor = state[name][: config.vocab_size] if vocabulary else state[name]
        parts = tensor.split(cuts[len(sources)]) if len(sources) > 1 else [tensor]
        out.update(zip(sources, parts))
    return {name: tensor.contiguous() for name, tensor in out.items()}


# model_type of the config.json families that are Llama-shaped: RoPE, RMSNorm, SwiGLU.
LLAMA_FAMILIES = ("llama", "mistral", "qwen2")


def _rope_scaling(hf: dict, where: Path) -> dict | None:
    """config.json's rope scaling in our form (None for plain RoPE), or a refusal naming it.
    Published configs hold it in `rope_scaling`, its kind as `type` or (since transformers 4.45)
    `rope_type`; transformers 5 writes `rope_parameters`, the base `rope_theta` inside."""
    from model.config import ROPE_SCALING_KEYS

    raw = hf.get("rope_scaling")
    if raw is None and isinstance(hf.get("rope_parameters"), dict):
        raw = {k: v for k, v in hf["rope_parameters"].items() if k != "rope_theta"}
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RelayError(f"{where}: rope_scaling must be an object, got {raw!r:.60}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise RelayError(f"{where}: rope_scaling.rope_type {kind!r} is not supported (supported: {', '.join(ROPE_SCALING_KEYS)})")
    if kind == "llama3" and "original_max_position_embeddings" not in raw:
        raise RelayError(f"{where}: rope_scaling of type llama3 needs original_max_position_embeddings")
    missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in raw]
    if missing:
        raise RelayError(f"{where}: rope_scaling of type {kind} lacks {', '.join(missing)}")
    return {"rope_type": kind, **{key: raw[key] for key in ROPE_SCALING_KEYS[kind]}}


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(hf.get("rope_theta", 10000.0))


def config_from_llama(hf: dict, where: Path) -> GPTConfig:
    """Our config of a Llama, Mistral or Qwen2 config.json, refusing what we do not implement
    with the key that says so."""
    family = hf.get("model_type", "llama")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise RelayError(f"{where}: hidden_act {act!r} is not supported (silu only)")
    if family == "qwen2":
        # Qwen2 has biases on q, k and v and nowhere else.
        qkv_bias, bias = True, False
    else:
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise RelayError(f"{where}: attention_bias and mlp_bias differ; relaygpt models have biases everywhere or nowhere")
        qkv_bias, bias = None, bool(hf.get("attention_bias", False))
    try:
        heads, width = int(hf["num_attention_heads"]), int(hf["hidden_size"])
        head_dim = int(hf.get("head_dim") or width // heads)
        if head_dim * heads != width:
            raise RelayError(f"{where}: head_dim {head_dim} x {heads} heads is not hidden_size {width}; relaygpt needs them equal")
        context = int(hf.get("max_position_embeddings", 2048))
        window = hf.get("sliding_window") if (family == "mistral" or hf.get("use_sliding_window")) else None
        if window is not None:
            # Within the window sliding-window attention is causal attention: a context no longer
            # than the window gives the published model's outputs exactly.
            context = min(context, int(window))
        config = GPTConfig(
            vocab_size=int(hf.get("relaygpt", {}).get("vocab_size", hf["vocab_size"])), block_size=context,
            n_layer=int(hf["num_hidden_layers"]), n_head=heads, n_embd=width,
            n_kv_head=int(hf.get("num_key_value_heads") or heads), n_inner=int(hf["intermediate_size"]),
            position="rope", rope_theta=_rope_theta(hf), norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="swiglu", bias=bias, qkv_bias=qkv_bias, dropout=0.0, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=_rope_scaling(hf, where),
        )
    except KeyError as exc:
        raise RelayError(f"{where}: config.json lacks {exc.args[0]!r}, which a {family} config needs") from None
    except (TypeError, ValueError) as exc:
        raise RelayError(f"{where}: {exc}") from None
    return config


def llama_recipe(config: GPTConfig) -> dict[str, tuple[list[str], bool]]:
    """{our name: (the Llama-family tensors concatenated into it, in order; whether its rows are
    the vocabulary, padded with zeros to the padded vocabulary)}. A tied head is left out."""
    recipe: dict[str, tuple[list[str], bool]] = {
        "transformer.wte.weight": (["model.embed_tokens.weight"], True), "transformer.ln_f.weight": (["model.norm.weight"], False)}
    if not config.tie_embeddings:
        recipe["lm_head.weight"] = (["lm_head.weight"], True)
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        recipe[ours + "ln_1.weight"] = ([theirs + "input_layernorm.weight"], False)
        recipe[ours + "ln_2.weight"] = ([theirs + "post_attention_layernorm.weight"], False)
        for kind in ("weight", "bias") if config.attn_qkv_bias else ("weight",):
            recipe[ours + f"attn.c_attn.{kind}"] = ([theirs + f"self_attn.{p}_proj.{kind}" for p in "qkv"], False)
        for kind in ("weight", "bias") if config.bias else ("weight",):
            recipe[ours + f"attn.c_proj.{kind}"] = ([theirs + f"self_attn.o_proj.{kind}"], False)
            recipe[ours + f"mlp.c_fc.{kind}"] = ([theirs + f"mlp.{p}_proj.{kind}" for p in ("gate", "up")], False)
            recipe[ours + f"mlp.c_proj.{kind}"] = ([theirs + f"mlp.down_proj.{kind}"], False)
    return recipe


def state_from_llama(weights, config: GPTConfig, where: Path) -> dict[str, torch.Tensor]:
    """Llama-family weights (a mapping of their names) under our GPT names, the vocabulary
    padded with zero rows."""
    state = {name: llama_tensor(weights, sources, vocabulary, config, where)
             for name, (sources, vocabulary) in llama_recipe(config).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def llama_tensor(weights, sources: list[str], vocabulary: bool, config: GPTConfig, where: Path) -> torch.Tensor:
    """One of our tensors from the Llama-family tensors its recipe names (`sources`)."""
    parts = []
    for source in sources:
        if source not in weights:
            raise RelayError(f"{where}: no tensor {source!r}; not a checkpoint of this config")
        parts.append(weights[source].float())
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
    missing = config.padded_vocab_size - tensor.size(0) if vocabulary else 0
    return torch.cat([tensor, tensor.new_zeros(missing, tensor.size(1))]) if missing > 0 else tensor
