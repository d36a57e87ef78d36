"""Shared fixtures: offline environment, the shared data folder, small models and tokenizers.

The environment is fixed at import time so every process a test starts (DeepSpeed ranks,
CLI subprocesses, Ray workers) inherits it: CPU accelerator for DeepSpeed, no hub access, and
a tiktoken cache built from ../shared/data/tiktoken (see tests/tiktoken_cache.py).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RELAYGPT_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
sys.path.insert(0, str(REPO / "tests"))

from tiktoken_cache import build_tiktoken_cache  # noqa: E402

_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="relaygpt-tests-"))
atexit.register(shutil.rmtree, _CACHE_ROOT, True)
os.environ["TIKTOKEN_CACHE_DIR"] = str(build_tiktoken_cache(SHARED_DATA / "tiktoken", _CACHE_ROOT / "tiktoken"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray in the tests stays on 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA} (expected ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare(shared_data) -> str:
    return (shared_data / "pretrain" / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from model.tokenizer import Tokenizer

    return Tokenizer.from_name("gpt2")


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, shakespeare):
    """A 1024-token BPE trained on tinyshakespeare and saved (so it pickles by path)."""
    from model.tokenizer import Tokenizer

    tok = Tokenizer.train([shakespeare[:300_000]], 1024, name="shakespeare-1k")
    tok.save(tmp_path_factory.mktemp("tok") / "shakespeare-1k")
    return tok


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for the whole test session (starting one costs 10-30 s), loopback only."""
    import ray

    from cluster.runtime import start_embedded

    start_embedded(num_cpus=8)  # logical CPUs: headroom so a test never waits on one that a previous test still holds
    yield ray
    ray.shutdown()
