"""files.replacing / write_atomically: the one atomic write every file lorakit writes goes through."""

import os
import stat

import pytest

from lorakit.files import new_file_mode, replacing, write_atomically


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_file_is_written_whole_with_the_umasks_mode_or_not_at_all(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_atomically(tmp_path / "a.json", "first")
        assert path.read_text() == "first" and mode(path) == 0o640 == new_file_mode()
        with pytest.raises(RuntimeError, match="disk full"):
            with replacing(path) as tmp:
                tmp.write_text("half of the secon")
                raise RuntimeError("disk full")
        assert path.read_text() == "first"  # the old content, untouched
        write_atomically(path, b"\x00second")
        assert path.read_bytes() == b"\x00second"
        assert sorted(os.listdir(tmp_path)) == ["a.json"]  # no temporary left behind
    finally:
        os.umask(old)


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "step-4"
    old = os.umask(0o027)
    try:
        with replacing(target, directory=True) as tmp:
            (tmp / "weights").write_text("1")
    finally:
        os.umask(old)
    assert sorted(os.listdir(target)) == ["weights"] and mode(target) == 0o750  # not mkdtemp's 0700
    with pytest.raises(KeyboardInterrupt):
        with replacing(target, directory=True) as tmp:
            (tmp / "other").write_text("2")
            raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["weights"] and sorted(os.listdir(tmp_path)) == ["step-4"]
    with replacing(target, directory=True) as tmp:
        (tmp / "other").write_text("2")
    assert sorted(os.listdir(target)) == ["other"]  # the old directory is replaced, not merged
