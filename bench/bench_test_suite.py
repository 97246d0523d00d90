"""`make test` from fresh clones: wall clock (install included), pytest's own time, CPU used and
the test counts, for one or more revisions, interleaved on this machine.

Each run clones this repository at a revision into `--workdir` (default: beside this clone, so
that the tests find `../shared/reference` as CI does; SUBSPACE_REFERENCE is passed on when set),
runs `bash .ci/run` there (exactly CI's command: set up `.venv`, ruff, pytest on two workers) and
removes the clone (about 1.5 GB with its venv) unless `--keep`. With several revisions and
`--repeats`, the order is rev1, rev2, ..., rev1, rev2, ...: the machine's speed drifts over
minutes, so compare revisions within one invocation, by their ratio. Run nothing else meanwhile.

    python bench/bench_test_suite.py HEAD~3 HEAD [--repeats 2] [--workdir DIR] [--keep]

Printed per run: the revision, wall seconds of `bash .ci/run`, pytest's reported seconds (the
rest is the install and ruff), busy CPU seconds of the machine meanwhile (so run nothing else),
the share of the two cores that is, the load average at the start, and pytest's summary line.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUMMARY = re.compile(r"^=*\s*(\d+ passed.*?) in ([\d.]+)s")


def resolve(revision: str) -> str:
    """The full commit hash of `revision` in this repository."""
    result = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: '{revision}' is not a commit of {ROOT}: give a branch, tag "
                         "or hash.")
    return result.stdout.strip()


def busy_cpu_seconds() -> float:
    """CPU seconds the machine has spent busy so far (all CPUs; /proc/stat without idle,
    iowait and steal), or where there is no /proc/stat, the user + system seconds of the finished
    children of this process. The machine-wide count also holds processes that outlive their
    parent's wait, such as the tests' forkserver (tests/script_runner.py) and its children."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime
    # cpu user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run_once(commit: str, workdir: Path, keep: bool) -> dict:
    """Clone at `commit`, time `bash .ci/run` there, and return what was measured."""
    clone = workdir / f"suite_{commit[:10]}"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "--quiet", commit], cwd=clone, check=True)
    load = os.getloadavg()[0]
    cpu_before, began = busy_cpu_seconds(), time.perf_counter()
    result = subprocess.run(["bash", ".ci/run"], cwd=clone, capture_output=True, text=True)
    wall = time.perf_counter() - began
    cpu = busy_cpu_seconds() - cpu_before
    summary, pytest_seconds = "no pytest summary (see the output above)", float("nan")
    for line in result.stdout.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            summary, pytest_seconds = match.group(1).strip(" ="), float(match.group(2))
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", file=sys.stderr)
    if not keep:
        shutil.rmtree(clone, ignore_errors=True)
    return {"commit": commit[:10], "wall": wall, "pytest": pytest_seconds, "cpu": cpu,
            "load": load, "code": result.returncode, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revisions", nargs="+", help="commits to time (e.g. HEAD~3 HEAD)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each revision")
    parser.add_argument("--workdir", type=Path, default=ROOT.parent,
                        help="where the clones go (default: beside this clone)")
    parser.add_argument("--keep", action="store_true", help="keep the clones and their venvs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} is not a folder")
    commits = [resolve(r) for r in args.revisions]
    try:
        from models.utils import machine_kind

        machine = machine_kind()
    except ImportError:  # run outside the venv: the kind needs torch
        machine = "CPU kind unknown (run with .venv/bin/python)"
    print(f"Machine: {machine}, {os.cpu_count()} logical CPUs")
    print(f"{'commit':<10}  {'wall s':>7}  {'pytest s':>8}  {'CPU s':>6}  {'cores':>5}  "
          f"{'load':>4}  summary")
    failed = False
    for _ in range(args.repeats):
        for commit in commits:
            row = run_once(commit, args.workdir, args.keep)
            failed |= row["code"] != 0
            print(f"{row['commit']:<10}  {row['wall']:7.1f}  {row['pytest']:8.1f}  "
                  f"{row['cpu']:6.0f}  {row['cpu'] / row['wall']:5.2f}  {row['load']:4.1f}  "
                  f"{row['summary']}" + ("" if row["code"] == 0 else
                                         f"  (exit code {row['code']})"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
