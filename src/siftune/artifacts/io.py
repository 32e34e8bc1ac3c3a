"""Crash-safe file writes: a file is either its old complete self or its new complete self.

Every file siftune writes goes through :func:`atomic_write`: the content goes
to a temporary file in the same folder, is flushed to disk, and only then
renamed over the destination, and the folder entry is flushed too. A crash,
SIGKILL or power loss at any moment leaves the previous file intact (plus,
at worst, a stray ``.<name>.*.tmp`` file that :func:`remove_stale_temporaries`
clears). A failing disk (full, read-only, permission denied) is reported as a
one-line :class:`~siftune.errors.WriteError`.

A new file gets the permissions a plain ``open()`` would give it (0644
under umask 0022), a new folder those of ``mkdir`` (0755); a file or folder
replaced keeps its own.
"""
from __future__ import annotations

import os
import shutil
import stat
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
        os.chmod(tmp, _mode_for(path, 0o666))  # mkstemp makes it private (0600)
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
    """Create or replace ``path`` as a whole folder; ``write(temp_folder)`` fills a sibling first.

    Whatever was at ``path`` (a folder or a file) is swapped out only once the
    new folder is complete, and deleted after. On any failure ``path`` is as
    it was and nothing is left behind: no temporary folder, and no parent
    folder this call created. Raises :class:`WriteError` naming ``path`` when
    the disk refuses. Callers decide whether ``path`` may be replaced at all.
    """
    path = Path(path)
    created = [p for p in path.parents if not p.exists()]  # deepest first, for removal on failure
    tmp = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
        os.chmod(tmp, _mode_for(path, 0o777))  # mkdtemp makes it private (0700)
        write(tmp)
        _as_if_opened(tmp)
        if os.path.lexists(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=TEMP_SUFFIX, dir=path.parent))
            os.replace(path, old / "previous")
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / "previous", path)  # put it back before reporting
                raise
            tmp = None
            _remove(old)
        else:
            os.replace(tmp, path)
            tmp = None
        fsync_dir(path.parent)
    except BaseException as exc:
        for leftover in (tmp, old):
            if leftover is not None:
                _remove(leftover)
        for folder in created:
            try:
                folder.rmdir()  # only while empty: never anything someone else put there meanwhile
            except OSError:
                break
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise _write_error(path, exc) from None
        raise
    return path


def umask() -> int:
    """The process's file mode creation mask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


def _mode_for(path: Path, full: int) -> int:
    """The mode ``open()`` (``full`` 0o666) or ``mkdir`` (0o777) would leave ``path`` with: its own if it
    exists as the same kind (file or folder), else ``full`` less the umask."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return full & ~umask()
    return stat.S_IMODE(mode) if stat.S_ISDIR(mode) == (full == 0o777) else full & ~umask()


def _as_if_opened(folder: Path) -> None:
    """Give what a writer put in ``folder`` the modes plain ``open()`` and ``mkdir`` give: some writers
    (transformers' save_pretrained) write through private temporary files, which would leave the
    files unreadable to anyone but their owner."""
    mask = umask()
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                executable = os.stat(file).st_mode & stat.S_IXUSR
                os.chmod(file, (0o777 if executable else 0o666) & ~mask)


def _remove(path: Path) -> None:
    """Delete a file or folder tree, quietly: used while another error is being reported."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)
