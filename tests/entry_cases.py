"""Run entry-script invocations as a user would, cheaply: one process imports torch and the
project's modules once, then forks one child per invocation, which runs the script as `__main__`
with its own argv (so every child gets fresh absl flags; script_runner.run_as_main) and reports
its exit status and stderr.

    python tests/entry_cases.py < cases.json > results.json

A case is {"target": "main.py" | "analysis.rmsd" | ..., "args": [...]}; a result is
{"status": int, "stderr": str}. Used by tests/test_entry_errors.py.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from script_runner import fresh_search_path, run_as_main

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300.0


def _warm_imports() -> None:
    # What the scripts import lazily; the children inherit it instead of importing it again.
    # absl, ml_collections and cli were about half of each child's time (0.1 s of 0.2 s);
    # they define no flags of a script (the scripts do, each child afresh).
    import torch  # noqa: F401
    from absl import app, flags, logging  # noqa: F401
    from ml_collections import config_flags  # noqa: F401

    import cli  # noqa: F401
    import controllable_generation  # noqa: F401
    import datasets  # noqa: F401
    import evaluation  # noqa: F401
    import likelihood  # noqa: F401
    import run_lib  # noqa: F401
    import subspace_run  # noqa: F401
    import subspace_sampling  # noqa: F401
    from analysis import batches, cutoffs  # noqa: F401
    from models import subspace_model  # noqa: F401


def run_cases(cases: list[dict]) -> list[dict]:
    """Run each case in a forked child; return its exit status and stderr."""
    results = []
    search_path = fresh_search_path(os.environ.get("PYTHONPATH"))
    with tempfile.TemporaryDirectory() as folder:
        for index, case in enumerate(cases):
            err_path = os.path.join(folder, f"{index}.err")
            pid = os.fork()
            if pid == 0:
                target = case["target"]
                command = [str(ROOT / target)] if target.endswith(".py") else ["-m", target]
                run_as_main([*command, *case["args"]], str(ROOT), None, os.devnull, err_path,
                            search_path)
            deadline = time.monotonic() + TIMEOUT
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    status = 124 << 8
                    break
                time.sleep(0.02)
            stderr = Path(err_path).read_text() if os.path.exists(err_path) else ""
            results.append({"status": os.waitstatus_to_exitcode(status), "stderr": stderr})
    return results


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    os.environ.pop("SUBSPACE_DEBUG", None)
    import torch

    torch.set_num_threads(1)
    _warm_imports()
    json.dump(run_cases(json.load(sys.stdin)), sys.stdout)
