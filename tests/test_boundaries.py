"""Import boundaries that keep the CLI fast and model/ portable."""

import subprocess
import sys


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_model_package_needs_only_torch():
    loaded = _loaded_after("import model.gpt, model.generate, model.export, model.tokenizer, model.chat")
    assert not {"ray", "deepspeed", "datasets", "transformers"} & loaded


def test_cli_help_imports_no_heavy_library():
    loaded = _loaded_after("import cluster.cli")
    assert not {"torch", "ray", "deepspeed", "datasets", "transformers", "tiktoken"} & loaded
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout
