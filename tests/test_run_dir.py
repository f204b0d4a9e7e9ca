"""The run directory: where a run may start, and the lock that keeps a second run out."""

import os

import pytest

from lorakit.training.run_dir import check_run_dir, lock_holder, run_lock


def test_a_new_run_needs_a_new_or_empty_directory(tmp_path):
    check_run_dir(tmp_path / "new", resume=False)
    check_run_dir(tmp_path, resume=False)  # empty
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"run directory {tmp_path} is not empty and is not a lorakit run "
                                         r"\(it holds notes.txt\)"):
        check_run_dir(tmp_path, resume=False)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match=rf"{tmp_path} already holds a run; continue it with --resume {tmp_path}"):
        check_run_dir(tmp_path, resume=False)
    check_run_dir(tmp_path, resume=True)


def test_no_run_writes_through_a_link(tmp_path):
    (tmp_path / "checkpoints").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match=r"checkpoints is a symbolic link .* lorakit never writes through a link"):
        check_run_dir(tmp_path, resume=True)


def test_the_lock_names_its_holder_and_keeps_a_second_run_out(tmp_path):
    run = tmp_path / "run"
    assert lock_holder(run) is None
    with run_lock(run):
        assert lock_holder(run) == str(os.getpid())
        with pytest.raises(ValueError, match=rf"{run} is in use by another lorakit train \(pid {os.getpid()}\)"):
            check_run_dir(run, resume=True)
        with pytest.raises(ValueError, match=rf"{run} is in use by another lorakit train \(pid {os.getpid()}\)"):
            with run_lock(run):
                pass
    assert lock_holder(run) is None  # released with the run
    with run_lock(run, main=False):  # other ranks take no lock
        assert lock_holder(run) is None
