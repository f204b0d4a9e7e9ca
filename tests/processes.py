"""`lorakit` commands run as processes of their own, started by fork instead of a fresh interpreter.

`python -m lorakit ...` spends ~7 s importing torch and transformers before it reads its arguments,
and the CLI tests run ~40 such commands. `Forkserver` starts one interpreter (the server) that imports
what a command imports, once, and forks a child for each command. The child is a process of its own,
as a user's would be: its own exit status, stdin, stdout and stderr (files), working directory,
environment, file-size limit, locks and signals. It runs `lorakit.cli.main(argv)` as
`python -m lorakit` does (or a script, as `python SCRIPT` does): its exit status, a traceback for an
exception, atexit handlers at exit.

Forking is safe because the server never runs a torch operation and holds one thread when it forks
(it checks: BLAS or OpenMP pools started before a fork would be missing in the child).
OMP_NUM_THREADS=1 keeps numpy's OpenBLAS from starting its pool at import.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Settings read when a module is imported (the hub's offline switches, the thread pools): they are
# the server's, so every command sees them.
ENV = {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

SERVER = textwrap.dedent("""
    import atexit, json, os, resource, runpy, signal, sys, traceback
    import lorakit.cli, lorakit.training  # what every command imports (torch, transformers, ...)
    import transformers
    transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.LlamaForCausalLM  # lazy modules
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        sys.exit(f"the fork server holds {len(threads)} threads after its imports; a fork would lose them")
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            break
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    else:
        sys.exit(0)
    # the child: a process as `python -m lorakit ARGV` (or `python SCRIPT ARGV`) in CWD would be
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # A full file system: writes past the limit fail with EFBIG (also the command's stdout and
    # stderr, which are files here).
    if request["limit_file_bytes"]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["limit_file_bytes"],) * 2)
    for fd, name, flags in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        opened = os.open(request[name], flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
    try:
        if request["script"] is None:
            sys.argv = ["lorakit", *request["argv"]]
            code = lorakit.cli.main(request["argv"])
        else:  # python SCRIPT ARGV
            sys.argv = [request["script"], *request["argv"]]
            sys.path.insert(0, os.path.dirname(request["script"]))
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
    except SystemExit as e:  # argparse's exits, sys.exit in a command
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if not isinstance(code, int):  # sys.exit(None) or sys.exit("message"), as the interpreter takes them
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    # The interpreter's shutdown would take ~2.5 s here (it visits every object of torch and
    # transformers, copying the pages fork shares); of what it does, a command needs its atexit handlers.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
""")


class Forkserver:
    """Runs `lorakit ARGV` (or a Python script) in forked processes; `run` returns a
    subprocess.CompletedProcess."""

    def __init__(self):
        self.files = tempfile.TemporaryDirectory(prefix="lorakit-forkserver-")  # a command's stdin, stdout, stderr
        self.server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env={**os.environ, **ENV}, start_new_session=True)
        self.pending = b""  # what the server wrote past the last line read
        assert self.line() == "ready"

    def run(self, *argv, stdin: str = "", cwd=None, env=None, limit_file_bytes: int | None = None,
            timeout: float = 300, script=None) -> subprocess.CompletedProcess:
        """`lorakit ARGV` (or `python SCRIPT ARGV`) with `stdin` as its input, in `cwd`, with the
        environment plus `env`. On a timeout the command is killed and subprocess.TimeoutExpired
        raised, as subprocess.run does."""
        argv = [str(a) for a in argv]
        files = {name: Path(self.files.name) / name for name in ("stdin", "stdout", "stderr")}
        files["stdin"].write_text(stdin)
        for name in ("stdout", "stderr"):
            files[name].write_text("")
        request = {"argv": argv, "script": script and str(script), "cwd": str(cwd or os.getcwd()),
                   "env": {**os.environ, **ENV, **(env or {})}, "limit_file_bytes": limit_file_bytes,
                   **{name: str(path) for name, path in files.items()}}
        self.server.stdin.write(json.dumps(request).encode() + b"\n")
        self.server.stdin.flush()
        command = ["lorakit", *argv] if script is None else [sys.executable, str(script), *argv]
        pid = json.loads(self.line())["pid"]
        try:
            returncode = json.loads(self.line(timeout))["returncode"]
            timed_out = False
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            returncode, timed_out = json.loads(self.line())["returncode"], True
        out, err = (files[name].read_text() for name in ("stdout", "stderr"))
        if timed_out:
            raise subprocess.TimeoutExpired(command, timeout, out, err)
        return subprocess.CompletedProcess(command, returncode, out, err)

    def line(self, timeout: float | None = None) -> str:
        """The server's next line; TimeoutError if none is complete within `timeout` seconds."""
        fd = self.server.stdout.fileno()
        while b"\n" not in self.pending:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the lorakit fork server ended (exit {self.server.wait()})")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        """Ends the server (its input closes) and waits for it."""
        self.server.stdin.close()
        self.server.wait(timeout=60)
        self.server.stdout.close()
        self.files.cleanup()
