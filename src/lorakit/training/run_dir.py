"""The run directory: what a run may start in, and the lock that keeps a second run out of it.

A new run goes into a new or empty directory; a resumed run into its own. Rank 0 holds an exclusive
flock on <run_dir>/.lock while the run lasts and writes its pid there, so a second `lorakit train`
into the same directory fails at once and names the holder. No run writes through a symbolic link
in a run directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run goes into a new or empty directory; no run writes through a symbolic link in it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file; choose a new or empty directory for --out")
    if not run_dir.is_dir():
        return
    holder = lock_holder(run_dir)
    if holder:
        raise ValueError(f"{run_dir} is in use by another lorakit train (pid {holder}); wait for it to "
                         "finish, or choose another --out")
    if not resume:
        if (run_dir / "config.yaml").exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                             "or choose another --out")
        present = sorted(set(os.listdir(run_dir)) - {LOCK_NAME})
        if present:
            raise ValueError(f"run directory {run_dir} is not empty and is not a lorakit run (it holds "
                             f"{', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); a run starts in a "
                             "new or empty directory: choose another --out (nothing was changed)")
    for parent, dirs, files in os.walk(run_dir):  # never descends into a linked directory
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); lorakit never writes "
                                 "through a link in a run directory: remove it (nothing was changed)")


@contextlib.contextmanager
def run_lock(run_dir: Path, main: bool = True):
    """Create the run directory and hold an exclusive lock on its .lock file while the run lasts
    (rank 0 only), so a second `lorakit train` into it fails at once. flock's lock belongs to the
    open file: the kernel releases it when the process ends, kill -9 included."""
    if not main:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ValueError(f"cannot write the run directory {run_dir} ({e.strerror}); choose a writable "
                         "directory for --out") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another lorakit train (pid {_pid_in(fd)}); wait for "
                             "it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder(run_dir: Path) -> str | None:
    """The pid written in the run directory's lock file while a run holds it; None when free."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or not readable): the lock itself decides later
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
