"""Run an entry script as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would, in a process
forked from a server that has already imported torch (multiprocessing's forkserver, one server
per test process).

A fresh interpreter spends 3-4 s before a training script's first step on a fast core, most of
it importing torch and torch._dynamo (which the first optimizer imports); the suite starts
about sixty scripts, torchrun agents and workers. Forked from the server, each script still runs
as `__main__` in a process of its own, with its own imports of this project's modules and of
every other library, its own flags, working directory, environment, standard streams, exit
status (negative for a signal) and atexit handlers: only torch and torch._dynamo are already in
`sys.modules`. torchrun's workers come from the same server through a relay (`worker_environment`
and the section above it).

SUBSPACE_TESTS_FRESH_INTERPRETERS=1 starts a real interpreter for every script and worker instead
(slower, the same results). The tests that check what a fresh interpreter imports, and the
notebook kernels, always start real interpreters.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import functools
import importlib.machinery
import io
import json
import logging
import multiprocessing
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

# What the server imports before it forks: the two packages that take most of a start-up and
# that no script of this project reaches into without importing them itself.
PRELOAD = ["torch", "torch._dynamo"]
FRESH_INTERPRETERS_ENV = "SUBSPACE_TESTS_FRESH_INTERPRETERS"

_context = None


def _fresh_interpreters() -> bool:
    return os.environ.get(FRESH_INTERPRETERS_ENV, "") not in ("", "0")


def _server_context():
    """The forkserver context, its server started on first use with PRELOAD imported."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_status(error: SystemExit) -> int:
    """The exit status the interpreter gives `raise SystemExit(code)`."""
    if error.code is None:
        return 0
    if isinstance(error.code, int):
        return error.code
    print(error.code, file=sys.stderr)
    return 1


def _exec_as_main(path: str) -> None:
    """Run the file `path` as the interpreter runs `python PATH`: a new `__main__` module whose
    `__file__` is the absolute path, `sys.argv[0]` left as given (runpy.run_path would set it to
    the path)."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins,
                           __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = module
    with open(path, "rb") as handle:
        code = compile(handle.read(), path, "exec")
    exec(code, module.__dict__)


@functools.cache
def fresh_search_path(python_path: str | None) -> tuple[str, ...]:
    """`sys.path` of a fresh interpreter with PYTHONPATH=`python_path`, after its first entry
    (the script's folder or the working directory)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python_path is not None:
        env["PYTHONPATH"] = python_path
    listed = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"],
                            cwd="/", env=env, capture_output=True, text=True, check=True)
    return tuple(json.loads(listed.stdout)[1:])


def run_as_main(args: list[str], cwd: str, env: dict[str, str] | None, stdout: str | None,
                stderr: str | None, search_path: tuple[str, ...]) -> None:
    """In a forked child: become `python *args` (`-u` may come first) started in `cwd` with the
    environment `env` (None: keep this one), the search path `search_path` after the script's
    folder (`fresh_search_path`), and the output in the files `stdout` and `stderr` (the same
    path: one stream; None: the standard streams as they are); run to the end with the exit
    handlers it registers, and exit with the interpreter's status. Never returns."""
    if stdout is not None:
        out = os.open(stdout, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        err = out if stderr == stdout else os.open(stderr,
                                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(out, 1)
        os.dup2(err, 2)
    if args[0] == "-u":  # unbuffered standard streams
        args = args[1:]
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                      errors="backslashreplace")
    # The exit handlers of the process this child was forked from are not the script's (one
    # removes that process's temporary folder); logging's is what a fresh interpreter has.
    atexit._clear()
    atexit.register(logging.shutdown)
    os.chdir(cwd)
    if env is not None:
        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ.clear()
        os.environ.update(env)
        if env.get("OMP_NUM_THREADS", threads) != threads:  # torch read the server's at import
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    status = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[:] = [os.getcwd(), *search_path]
            sys.modules.pop(args[1], None)  # a warm copy would not run as __main__
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(args[0])
            sys.argv = list(args)
            sys.path[:] = [os.path.dirname(script), *search_path]
            _exec_as_main(script)
    except SystemExit as error:
        status = _exit_status(error)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


# ------------------------------------------------------------------------------------------------
# torchrun's workers. torchrun starts each as `$PYTHON_EXEC -u SCRIPT ARGS` (a fresh interpreter
# by default). With PYTHON_EXEC = tests/relay_python, that command is a relay (this file run by
# `python -S`, no torch) that hands its arguments, environment, working directory and standard
# streams to a worker server (forked from the forkserver, torch imported) over a Unix socket.
# The server forks a handler per relay, which forks the worker, tells the relay its pid,
# waits for it and sends its exit status. The relay passes on the signals torchrun sends it
# and ends with the worker's status (by the same signal when the worker was killed); when
# the relay itself is killed, the handler kills the worker.

RELAY_PYTHON = Path(__file__).resolve().parent / "relay_python"
WORKER_SOCKET_ENV = "SUBSPACE_TESTS_WORKER_SOCKET"
_RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                    signal.SIGUSR1, signal.SIGUSR2)
_worker_socket: list[str] = []  # the worker server's socket, once it runs


def _handle_relay(connection: socket.socket, search_path: tuple[str, ...]) -> None:
    """In a handler forked by the worker server: run one relay's worker and report on it."""
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        run_as_main(request["args"], request["cwd"], request["env"], None, None, search_path)
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}".encode())
    while True:  # every 20 ms: has the worker ended, or its relay gone (then so must it)?
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        ready, _, _ = select.select([connection], [], [], 0.02)
        if ready and not connection.recv(64):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
    with contextlib.suppress(OSError):
        connection.sendall(f"{os.waitstatus_to_exitcode(status)}".encode())
    os._exit(0)


def _serve_workers(path: str, search_path: tuple[str, ...]) -> None:
    """The worker server: one handler (`_handle_relay`) per relay connecting to `path`."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the handlers
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as server:
        server.bind(path)
        server.listen(8)
        while True:
            connection, _ = server.accept()
            if os.fork() == 0:
                server.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _handle_relay(connection, search_path)
            connection.close()


def worker_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` for a torchrun launch whose workers are relayed to the worker server (started on
    first use); unchanged with SUBSPACE_TESTS_FRESH_INTERPRETERS=1."""
    if _fresh_interpreters():
        return env
    if not _worker_socket:
        folder = tempfile.mkdtemp(prefix="script-runner-")
        path = os.path.join(folder, "workers.sock")
        server = _server_context().Process(
            target=_serve_workers, args=(path, fresh_search_path(env.get("PYTHONPATH"))),
            daemon=True)
        server.start()
        while not os.path.exists(path) and server.is_alive():
            time.sleep(0.01)
        _worker_socket.append(path)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {**env, "PYTHON_EXEC": str(RELAY_PYTHON), WORKER_SOCKET_ENV: _worker_socket[0],
            "SUBSPACE_TESTS_PYTHON": sys.executable}


def _relay(args: list[str]) -> None:
    """The relay (see above): `args` are the interpreter arguments torchrun gave."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.connect(os.environ[WORKER_SOCKET_ENV])
        request = {"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(connection, [json.dumps(request).encode()], [0, 1, 2])
        pid = int(connection.recv(64))
        for number in _RELAYED_SIGNALS:
            signal.signal(number, lambda number, _: os.kill(pid, number))
        status = int(connection.recv(64))
    if status < 0:
        if -status not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


class ScriptProcess:
    """A started script, like subprocess.Popen: `wait()` returns its exit status (negative:
    killed by that signal), also kept in `returncode`."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None, stdout: Path,
                 stderr: Path) -> None:
        self.args = [sys.executable, *args]
        self.returncode: int | None = None
        env = dict(os.environ if env is None else env)
        if _fresh_interpreters():
            with open(stdout, "ab") as out, open(stderr, "ab") as err:
                self._popen = subprocess.Popen(self.args, cwd=cwd, env=env, stdout=out,
                                               stderr=subprocess.STDOUT
                                               if stderr == stdout else err)
            self.pid = self._popen.pid
            return
        self._popen = None
        search_path = fresh_search_path(env.get("PYTHONPATH"))
        self._process = _server_context().Process(
            target=run_as_main,
            args=(list(args), str(cwd), env, str(stdout), str(stderr), search_path))
        self._process.start()
        self.pid = self._process.pid

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the script; kill it and raise subprocess.TimeoutExpired after `timeout`."""
        if self._popen is not None:
            try:
                self.returncode = self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
                raise
            return self.returncode
        self._process.join(timeout)
        if self._process.exitcode is None:
            self._process.kill()
            self._process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        self.returncode = self._process.exitcode
        return self.returncode


def start_python(args: list[str], *, cwd: Path, log: Path,
                 env: dict[str, str] | None = None) -> ScriptProcess:
    """Start `python *args` in `cwd`, its stdout and stderr together in the file `log`."""
    Path(log).write_bytes(b"")
    return ScriptProcess(args, cwd, env, log, log)


def run_python(args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
               timeout: float | None = None, check: bool = False,
               text: bool = True) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
    text=text, timeout=timeout, check=check)`, the script run as the module docstring says."""
    with tempfile.TemporaryDirectory(prefix="script-runner-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        process = ScriptProcess(args, cwd, env, stdout, stderr)
        status = process.wait(timeout)
        outputs = [path.read_bytes() if path.exists() else b"" for path in (stdout, stderr)]
    if text:
        # Universal newlines, as subprocess's text mode.
        outputs = [data.decode().replace("\r\n", "\n").replace("\r", "\n")
                   for data in outputs]
    result = subprocess.CompletedProcess(process.args, status, *outputs)
    if check:
        result.check_returncode()
    return result


if __name__ == "__main__":
    _relay(sys.argv[1:])
