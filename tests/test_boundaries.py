"""Import boundaries that keep the CLI fast and model/ portable, and the structure rules (sizes, layers, cycles)."""

import functools
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


# --- structure: sizes, layers and cycles, read from the source (no imports, a few ms) ---------------

_LAYERS = {"model": 0, "pipelines": 1, "jobs": 2, "cluster": 3}
_MAX_FUNCTION_LINES = 60
_MAX_FILE_LINES = 400


@functools.cache
def _project_modules() -> dict:
    """dotted module name -> (path in the repository, parsed tree, line count) for every module of ours."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    modules = {}
    for package in _LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            text = path.read_text()
            modules[name] = (str(path.relative_to(root)), ast.parse(text), text.count("\n"))
    return modules


def _module_imports(tree, known: set[str]) -> set[str]:
    """Our modules a tree imports, at top level or inside a function: `from a.b import c` names a.b.c
    when that is a module, else a.b."""
    import ast

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def _import_graph() -> dict[str, set[str]]:
    modules = _project_modules()
    return {name: _module_imports(tree, set(modules)) - {name} for name, (_, tree, _) in modules.items()}


def test_functions_and_files_stay_small():
    import ast

    long_functions, large_files = [], []
    for path, tree, file_lines in _project_modules().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > _MAX_FUNCTION_LINES:
                    long_functions.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
        if file_lines > _MAX_FILE_LINES:
            large_files.append(f"{path} ({file_lines} lines)")
    assert not long_functions, long_functions
    assert not large_files, large_files


def test_no_module_imports_a_higher_layer():
    """model < pipelines < jobs < cluster: a module imports only its own layer and those below it."""
    upward = [
        f"{name} -> {target}"
        for name, targets in _import_graph().items()
        for target in targets
        if _LAYERS[target.split(".")[0]] > _LAYERS[name.split(".")[0]]
    ]
    assert not upward, upward


def test_no_import_cycle():
    """Counting imports inside functions too: a lazy import that closes a loop is still a loop."""
    graph = _import_graph()
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [name, target]))
            elif target not in state:
                visit(target, stack + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


# Attributes only a whole job has: its stage and cluster sections, its resolved dict. A plan below jobs/ carries
# none of these (DataPlan, TrainPlan, EvalPlan hold their own resolved fields).
_JOB_ONLY_ATTRIBUTES = {"stages", "cluster", "resolved_dict", "model_fields_set"}


def test_pipelines_never_see_the_raw_job():
    """Below jobs/, every stage takes its plan (jobs/plan.py): no function in pipelines/ has a
    parameter named `job`, no code there reads an attribute off a name `job`, and none reads a
    section only a whole job has (`.stages`, `.cluster`, `.resolved_dict()`)."""
    import ast

    leaks = []
    for name, (path, tree, _) in _project_modules().items():
        if not name.startswith("pipelines."):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p)]
                leaks += [f"{path}:{node.lineno} parameter {p.arg!r}" for p in params if p.arg == "job"]
            elif isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id == "job":
                    leaks.append(f"{path}:{node.lineno} job.{node.attr}")
                elif node.attr in _JOB_ONLY_ATTRIBUTES:
                    leaks.append(f"{path}:{node.lineno} .{node.attr}")
    assert not leaks, leaks
