"""Atomic file writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator, Union

__all__ = ["atomic_write", "atomic_write_text"]


def _default_file_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it; restored at once
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[str]:
    """Yields a temporary path in the target's folder; renamed over `path` on success."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp (and some writers, e.g. safetensors) create 0600 files; a plain open()
        # would honour the umask. Set after writing, since a writer may recreate the file.
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` then renames the result over `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, _write)
