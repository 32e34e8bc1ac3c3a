"""Crash-safe file writes: a file is either its old complete self or its new complete self.

Every file siftune writes goes through :func:`atomic_write`: the content goes
to a temporary file in the same folder, is flushed to disk, and only then
renamed over the destination, and the folder entry is flushed too. A crash,
SIGKILL or power loss at any moment leaves the previous file intact (plus,
at worst, a stray ``.<name>.*.tmp`` file that :func:`remove_stale_temporaries`
clears). A failing disk (full, read-only, permission denied) is reported as a
one-line :class:`~siftune.errors.WriteError`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import WriteError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Create or replace ``path`` atomically; ``write(temp_path)`` fills the temporary file.

    Raises :class:`WriteError` naming ``path`` when the folder cannot be
    created or the disk refuses the write; ``path`` is then left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _write_error(path, exc) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of a bytes object."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or a new file) to the disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms (Windows) cannot open a folder; the rename is then as durable as it gets
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; nothing more can be done there
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> None:
    """Delete temporary files an interrupted :func:`atomic_write` of ``folder/name*`` left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f".{name}*{TEMP_SUFFIX}"):
            _unlink_quietly(stale)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone, or the disk is failing: the error being raised says more


def _write_error(path: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc)
    return WriteError(f"cannot write {path}: {reason}; free some disk space or choose a writable folder")


def atomic_write_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create or replace the folder ``path`` as a whole; ``write(temp_folder)`` fills a sibling first.

    An existing folder is swapped out only once the new one is complete.
    Raises :class:`WriteError` naming ``path`` when the disk refuses.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=TEMP_SUFFIX, dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
