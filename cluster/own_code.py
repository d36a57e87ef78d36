"""Only relaygpt's own code runs: its packages are imported from where relaygpt is installed.

Python looks for a top-level package along `sys.path` in order, and more than one thing puts a
user's folder ahead of the installed relaygpt: `python -m` and `python -c` put the current
folder first, and Ray puts the driver's current folder first on every worker's path (before
the worker unpickles the function it is to run). A folder there named like one of relaygpt's
packages (an exported model directory called `model`, a planted `model/tokenizer.py`) would
then be imported in its place, and run.

`pin()` puts a finder at the front of `sys.meta_path` that answers for relaygpt's top-level
packages from `ROOT` alone (their sub-modules follow the package's own `__path__`); every
other import is left to Python. It runs in every relaygpt process before its first import of
another relaygpt package: the driver and local ranks through `cluster/__init__.py`, Ray
workers as their `worker_process_setup_hook` (which Ray runs when a worker starts, before it
adds the driver's folders to the path), and the local ranks are started without the current
folder on their path (`module_argv`), so that even a planted `cluster/` is never reached.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the folder holding relaygpt's packages (site-packages, or an editable checkout)
PACKAGES = ("cluster", "model", "pipelines", "jobs")
SETUP_HOOK = f"{__name__}.pin"  # what a Ray worker runs when it starts (runtime_env worker_process_setup_hook)


class OwnPackages(importlib.abc.MetaPathFinder):
    """Finds relaygpt's top-level packages in `ROOT` only, whatever `sys.path` holds ahead of it."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in PACKAGES:
            return None  # a sub-module (found through its package) or not relaygpt's: Python's own search
        # None when ROOT lacks it (packages shipped to a Ray Job one folder each): Python's search finds it.
        return importlib.machinery.PathFinder.find_spec(name, [str(ROOT)])


def pin() -> None:
    """Import relaygpt's packages from ROOT in this process from now on (idempotent)."""
    if not any(isinstance(finder, OwnPackages) for finder in sys.meta_path):
        sys.meta_path.insert(0, OwnPackages())


# `python -c` puts the current folder first on the path (as -m does); this drops it before the
# first import, unless -P / PYTHONSAFEPATH already kept it off.
_BOOTSTRAP = ("import sys; getattr(sys.flags, 'safe_path', False) or sys.path.pop(0); "
              "from {module} import main; sys.exit(main())")


def module_argv(module: str) -> list[str]:
    """The command line that runs `module.main()` in a new Python, as `python -m module` would,
    but without the current folder on its path: a child started in a folder holding a `cluster/`
    (or any other package) still imports relaygpt's own."""
    return [sys.executable, "-c", _BOOTSTRAP.format(module=module)]
