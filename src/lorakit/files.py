"""Opening the files a user points lorakit at (configs, safetensors weights) with errors that name
the file and say what is wrong, instead of a parser's traceback.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (name -> dtype,
shape, data offsets), then the tensor bytes. The safetensors library checks all of it when the
file is opened (header size, JSON, every offset inside the file and the file fully covered), so a
file that opens is consistent; lorakit only turns its SafetensorError into a ValueError that names
the file (and where a symlink points), and refuses things that are not regular files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def describe(path: str | os.PathLike) -> str:
    """The path, and where it really is when it is (or goes through) a symbolic link."""
    path = Path(path)
    real = path.resolve()
    return str(path) if real == path.absolute() else f"{path} (a link to {real})"


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file when it is not UTF-8, not JSON, or
    not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{describe(path)}: not UTF-8 text (byte {e.start}); expected a JSON object") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{describe(path)}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{describe(path)}: expected a JSON object {{...}}, found a {type(value).__name__}")
    return value


def new_file_mode() -> int:
    """The mode open() gives a new file, 0666 less the umask: for files made private by the way they
    are written (mkstemp, safetensors' writer: 0600) that should look like the rest of the user's
    files."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: os.umask reads it only by setting it, so it is set and put back."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, directory: bool = False):
    """Write `path` atomically: yields a new temporary path next to it (a file, or an empty directory
    when directory=True) to fill; when the block ends without an exception it is renamed onto `path`
    (a directory already there is removed first), with a new file's usual mode instead of mkstemp's
    private 0600. On any exception the temporary is removed and `path` is left as it was, so a
    crash, a kill or a full disk never leaves a half-written file under the final name.
    """
    path = Path(path)
    parent = path.parent
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    if not directory:
        os.close(made[0])
    tmp = Path(made if directory else made[1])
    try:
        if directory:  # mkdtemp's is 0700; a new directory's usual mode is 0777 less the umask
            os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if not directory:
            os.chmod(tmp, new_file_mode())  # writers such as safetensors' make the file private again
        if directory and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike, content: str | bytes) -> Path:
    """`path` holds `content` (text as UTF-8), written through replacing(): all or nothing."""
    with replacing(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)


def open_safetensors(path: str | os.PathLike):
    """safetensors' safe_open(path) (PyTorch tensors); ValueError naming the file when it is not a
    regular file or not a valid safetensors file (empty, truncated, bad header, offsets outside it)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.resolve().is_file():
        raise ValueError(f"{describe(path)}: not a regular file; expected a safetensors file")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ValueError(f"{describe(path)}: not a valid safetensors file ({e}); "
                         f"{path.stat().st_size:,} bytes") from None
