"""Durable, atomic file writes, shared by the spool, the derived-series writer and the weights writer.

A file is written under a temporary name in its own folder, fsynced, renamed over its final name
and the folder fsynced: a reader sees the old file or the whole new one, never a part, and after
the call returns the file survives a power cut. A re-written file replaces the earlier one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

# Leftovers of a write cut short by a crash carry this prefix; the spool removes them on start.
TEMP_PREFIX = ".incoming-"
# mkstemp creates files 0600; written files get the permissions open() would give them. The umask
# can only be read by setting it, so that happens once, at import, before any thread exists.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(fh) on a temporary file, then make it durable at path; nothing is left behind on failure."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
