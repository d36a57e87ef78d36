"""Small shared helpers for tests (importable from any test module)."""

from __future__ import annotations


def tiny_config(vocab_size: int, **overrides):
    from model.config import GPTConfig

    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64)
    return GPTConfig(**{**base, **overrides})


# Architectures every numerics test runs on: GPT-2 style and the modern variant.
ARCHITECTURES = {
    "gpt2": {},
    "modern": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
}


def relaygpt(*args, env: dict | None = None, stdin: str | None = None, timeout: float = 300):
    """Run the `relaygpt` command in a fresh process (its own driver), as a user would."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def relaygpt_on_a_terminal(*args, env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    """Run `relaygpt` with its stdout and stderr on a pseudo-terminal, as in a person's shell;
    returns the exit status and everything the terminal received (carriage returns included)."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *map(str, args)], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env={**os.environ, **(env or {})})
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # every writer has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)


def assert_one_line_error(proc, *needles) -> None:
    """Exit status 2 and one line on stderr naming what was wrong, no traceback."""
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


def hub_gpt2_dir(path, shared_data, *, seed: int, n_positions: int = 128, n_layer: int = 2):
    """A GPT-2 directory as the Hugging Face hub ships one: random weights (seeded), the real
    GPT-2 tokenizer files. Returns its path."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=64, n_layer=n_layer, n_head=4)).save_pretrained(path)
    shutil.copy(shared_data / "tiktoken" / "encoder.json", path / "vocab.json")
    shutil.copy(shared_data / "tiktoken" / "vocab.bpe", path / "merges.txt")
    return path


# Llama 3's split pattern (also cl100k's): case-insensitive contractions, letters with one
# leading non-letter, digits in threes, punctuation runs, newlines apart.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = [
    "Hello, world! It's 2026; we'll train 1234567 tokens.",
    "Ça va? Größe, naïve façade — déjà vu. Привет, как дела? 你好，世界。 こんにちは",
    "def f(x):\n\treturn {'a': [x ** 2, x // 3]}  # comment\n\n\nclass A:  pass\r\n",
    "emoji 🚀🔥👩‍💻 and flags 🇫🇷, math ∑∫√ ≤ ≥, tabs\t\tand   spaces   ",
    "   leading spaces, trailing newline\n",
]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# A Llama-3-Instruct-style chat template: bos, then per message a role header, the trimmed
# content and <|eot_id|>; the generation prompt opens an assistant header.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def llama3_style_tokenizer_dir(out, corpus: str, *, chat_template: bool = True):
    """A tokenizer.json as Llama 3 ships one, trained here with `tokenizers`: a Split by its
    regex, then ByteLevel without a regex, and added special tokens, saved beside the
    tokenizer_config.json AutoTokenizer reads (with LLAMA3_TEMPLATE as its chat_template)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=LLAMA3_SPECIALS, show_progress=False)
    tok.train_from_iterator([corpus, *TEXTS], trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat_template:
        config["chat_template"] = LLAMA3_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out
