"""Durable, atomic file writes, shared by the derived-series writer and the weights writer; the spool
(node/spool.py) writes the same way in two steps, staged in its root before the series is known.

A file is written under a temporary name in its own folder, fsynced, renamed over its final name
and the folder fsynced: a reader sees the old file or the whole new one, never a part, and after
the call returns the file survives a power cut. A re-written file replaces the earlier one.

Patient data never depends on the process umask (0022 outside systemd makes files 0644, readable
by every local user): the node's folders are created DATA_DIR_MODE (``private_dir``), its files
DATA_FILE_MODE, and a file written without an explicit mode gets no more access than its folder
grants, so a derived series written into the node's outbox is as closed as the outbox itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

# Leftovers of a write cut short by a crash carry this prefix; the spool removes them on start.
TEMP_PREFIX = ".incoming-"
# Patient data (spool, outbox, queue database, lock file): the owner (the service user) alone.
DATA_FILE_MODE = 0o600
DATA_DIR_MODE = 0o700
# mkstemp creates files 0600; written files get the permissions open() would give them. The umask
# can only be read by setting it, so that happens once, at import, before any thread exists.
_UMASK = os.umask(0)
os.umask(_UMASK)


def default_mode(folder: Path) -> int:
    """What open() would give a new file in folder, less the group/other access the folder withholds."""
    mode = 0o666 & ~_UMASK
    folder_mode = os.stat(folder).st_mode
    if not folder_mode & 0o070:
        mode &= ~0o070
    if not folder_mode & 0o007:
        mode &= ~0o007
    return mode


def atomic_write(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """Call write(fh) on a temporary file, then make it durable at path with mode (None: default_mode of
    its folder); nothing is left behind on failure."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, default_mode(path.parent) if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    # the rename itself must reach the disk, or a crash can leave the folder without the file
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """text as UTF-8, written as atomic_write_bytes writes bytes (newlines as they are in text)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def private_dir(path: Path, tighten: bool = False) -> Path:
    """path as a folder: missing ones (parents too) are created DATA_DIR_MODE whatever the umask. An
    existing folder is left as it is unless tighten, which takes group/other access away from it (a
    folder of the node's own that an earlier version created with the umask); not for folders an
    operator or systemd (StateDirectoryMode) chose."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DATA_DIR_MODE)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # another thread or process made it meanwhile; its creator set the mode
        os.chmod(folder, DATA_DIR_MODE)  # the umask can only take bits away; this makes it exact
    if tighten and not missing:
        restrict(path, DATA_DIR_MODE)
    return path


def restrict(path: Path, mode: int) -> None:
    """Take away the group/other access path has beyond mode (its owner's bits are left as they are)."""
    current = os.stat(path).st_mode & 0o777
    extra = current & 0o077 & ~mode
    if extra:
        os.chmod(path, current & ~extra)


def private_file(path: Path) -> None:
    """Create path empty with DATA_FILE_MODE if it is missing, or restrict an existing one to it:
    for files another library would create with the umask (SQLite's database, whose mode its -wal
    and -shm files copy)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DATA_FILE_MODE)
    except FileExistsError:
        restrict(path, DATA_FILE_MODE)
        return
    try:
        os.fchmod(fd, DATA_FILE_MODE)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
