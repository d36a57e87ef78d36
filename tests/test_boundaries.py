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


def _imported_packages(folder: str) -> dict[str, set[str]]:
    """module file -> the top-level project packages it imports (anywhere in the file)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in sorted((root / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        found[str(path.relative_to(root))] = names & {"model", "pipelines", "jobs", "cluster"}
    return found


def test_imports_run_downward():
    """model/ knows only itself; pipelines/ never reaches up into jobs/ or cluster/."""
    for path, packages in _imported_packages("model").items():
        assert packages <= {"model"}, (path, packages)
    for path, packages in _imported_packages("pipelines").items():
        assert packages <= {"model", "pipelines"}, (path, packages)
