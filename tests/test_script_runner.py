"""The tests' script runner (tests/script_runner.py) against a fresh interpreter: the same
argv, working directory, search path, environment, output, exit status and exit handlers, for
`python SCRIPT` and `python -m MODULE`, and none of this project's modules already imported."""
import os
import signal
import subprocess
import sys
import time

import pytest
from script_runner import run_python, start_python, worker_environment

PROBE = '''\
import atexit, json, os, sys
atexit.register(print, "exit handler of the script")
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path": sys.path, "name": __name__,
                  "file": __file__, "doc": __doc__, "spec": repr(__spec__)[:40],
                  "probe": os.environ.get("RUNNER_PROBE"),
                  "imported": [m for m in ("cli", "run_lib", "sampling", "conftest")
                               if m in sys.modules]}))
print("to stderr", file=sys.stderr)
mode = sys.argv[-1]
if mode == "status":
    sys.exit(3)
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("the probe failed")
if mode == "kill":
    sys.stdout.flush()
    os.kill(os.getpid(), 9)
'''


@pytest.fixture
def probe(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    return tmp_path


@pytest.mark.parametrize("mode", ["ok", "status", "message", "raise", "kill"])
@pytest.mark.parametrize("form", ["script", "module", "torchrun worker"])
def test_a_script_runs_as_in_a_fresh_interpreter(probe, form, mode, monkeypatch):
    # Folders put on this process's path (as pytest and imported packages do) stay out.
    monkeypatch.syspath_prepend(str(probe / "not-on-a-fresh-path"))
    args = {"script": ["probe.py", mode], "module": ["-m", "probe", mode],
            "torchrun worker": ["-u", "probe.py", mode]}[form]
    env = {**os.environ, "RUNNER_PROBE": f"{form}-{mode}"}
    if form == "torchrun worker":  # as torchrun starts it: `$PYTHON_EXEC -u SCRIPT ARGS`
        relayed = worker_environment(env)
        if "PYTHON_EXEC" not in relayed:
            pytest.skip("SUBSPACE_TESTS_FRESH_INTERPRETERS is set: torchrun starts interpreters")
        forked = subprocess.run([relayed["PYTHON_EXEC"], *args], cwd=probe, env=relayed,
                                capture_output=True, text=True, timeout=60)
    else:
        forked = run_python(args, cwd=probe, env=env, timeout=60)
    fresh = subprocess.run([sys.executable, *args], cwd=probe, env=env, capture_output=True,
                           text=True, timeout=60)
    assert forked.returncode == fresh.returncode and forked.stdout == fresh.stdout
    if mode == "raise":  # the traceback's innermost frame and message
        assert forked.stderr.splitlines()[-2:] == fresh.stderr.splitlines()[-2:]
    else:
        assert forked.stderr == fresh.stderr
    assert forked.returncode == {"ok": 0, "status": 3, "message": 1, "raise": 1,
                                 "kill": -signal.SIGKILL}[mode]
    assert f'"probe": "{form}-{mode}", "imported": []' in forked.stdout
    assert ("exit handler of the script" in forked.stdout) == (mode in ("ok", "status",
                                                                        "message", "raise"))
    if mode == "raise":
        assert "ValueError: the probe failed" in forked.stderr


def test_started_script_writes_one_log_and_can_be_killed(probe):
    (probe / "sleeper.py").write_text("import sys, time\nprint('up', flush=True)\n"
                                      "print('err', file=sys.stderr, flush=True)\n"
                                      "time.sleep(60)\n")
    process = start_python(["sleeper.py"], cwd=probe, log=probe / "sleeper.log")
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=3)
    assert process.returncode is None
    assert sorted((probe / "sleeper.log").read_text().split()) == ["err", "up"]


def test_a_torchrun_worker_gets_the_signals_of_its_relay(probe):
    """torchrun stops a worker by signalling the process it started (the relay): the worker
    gets the signal and the relay ends as the worker did."""
    (probe / "sleeper.py").write_text("import os, sys, time\nprint(os.getpid(), flush=True)\n"
                                      "time.sleep(60)\n")
    env = worker_environment(dict(os.environ))
    if "PYTHON_EXEC" not in env:
        pytest.skip("SUBSPACE_TESTS_FRESH_INTERPRETERS is set: torchrun starts interpreters")
    relay = subprocess.Popen([env["PYTHON_EXEC"], "-u", "sleeper.py"], cwd=probe, env=env,
                             stdout=subprocess.PIPE, text=True)
    worker = int(relay.stdout.readline())
    assert worker != relay.pid
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=30) == -signal.SIGTERM
    relay.stdout.close()
    with pytest.raises(ProcessLookupError):  # gone, and reaped by its handler
        for _ in range(300):
            os.kill(worker, 0)
            time.sleep(0.01)
