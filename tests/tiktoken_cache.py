"""Build a TIKTOKEN_CACHE_DIR from local rank files, so tiktoken.get_encoding works offline.

tiktoken caches each downloaded file under sha1(url). The URLs are read from tiktoken's own
encoding registry, and each is matched to the local file of the same name; tiktoken still
verifies every file against the sha256 it pins. (../shared/data/tiktoken/cache holds
pointer files rather than the data, so it cannot be used as the cache directly.)
"""

from __future__ import annotations

import hashlib
import inspect
import re
import shutil
from pathlib import Path


def build_tiktoken_cache(source_dir: Path, cache_dir: Path) -> Path:
    from tiktoken_ext import openai_public

    cache_dir.mkdir(parents=True, exist_ok=True)
    urls = set(re.findall(r'"(https://[^"]+)"', inspect.getsource(openai_public)))
    for url in urls:
        local = Path(source_dir) / url.rsplit("/", 1)[1]
        if local.is_file():
            shutil.copyfile(local, cache_dir / hashlib.sha1(url.encode()).hexdigest())
    return cache_dir
