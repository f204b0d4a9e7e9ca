"""tests/processes.py's forked commands against the real thing: `python -m lorakit` in a fresh
interpreter gives the same exit status, stdout and stderr."""

import os
import subprocess
import sys

import pytest
from processes import ENV


@pytest.mark.parametrize("argv", [["plan", "--model", "smollm2-135m", "--method", "qlora"],
                                  ["inspect", "no-such-adapter"]])
def test_a_forked_command_is_the_command_in_a_fresh_interpreter(forkserver, argv):
    fresh = subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True,
                           env={**os.environ, **ENV}, timeout=300)
    forked = forkserver.run(*argv)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == (0 if argv[0] == "plan" else 2) and fresh.stdout + fresh.stderr

