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
