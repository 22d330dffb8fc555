"""The spool: one file per received SOP instance, written so that a crash never leaves half a file.

Layout: ``<spool_dir>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. The path alone names the series
and the instance, so the queue can be rebuilt from the spool after a crash without parsing a
single file (see ``scan``). A file is written to a temporary name in the spool root, fsynced,
renamed over its final name and the series directory fsynced: after ``write_instance`` (or
``commit``) returns the instance survives a power cut, and a re-sent instance atomically replaces
the earlier copy. ``stage`` starts the write before the caller knows the series (the receiver
parses the header meanwhile); ``commit`` or ``discard`` finishes it.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ldct_node.durable import DATA_FILE_MODE, TEMP_PREFIX, fsync_dir, private_dir

# DICOM UIDs (PS3.5 §9): digits and dots, at most 64 characters. Checking this before a UID
# becomes a path component is what stops a hostile dataset writing outside the spool.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64
SUFFIX = ".dcm"


class SpoolFull(OSError):
    """The spool volume has less free space than the configured minimum, or ran out while writing."""


def is_valid_uid(uid: str) -> bool:
    return bool(uid) and len(uid) <= MAX_UID_LENGTH and bool(_UID.match(uid))


def write_all(fd: int, parts: tuple[bytes, ...]) -> None:
    """Write the parts in order with as few system calls as the kernel allows (no joined copy)."""
    views = [memoryview(part) for part in parts if len(part)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


class Staged:
    """An instance's bytes in a temporary file of the spool root, on their way to the disk."""

    def __init__(self, path: Path | None, fd: int | None = None, error: OSError | None = None):
        self.path = path  # None: nothing left on disk (failed, committed or discarded)
        self.fd = fd  # open until synced
        self.error = error

    def sync(self) -> None:
        """Return once the bytes are on disk; raise the OSError that kept them from it."""
        if self.error is not None:
            raise self.error
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def open_existing(path: Path) -> int | None:
    """A read-only descriptor of the file at path; None when there is none (or it cannot be opened)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None


class Releaser:
    """Closes, in a thread of its own, the descriptors that kept replaced spool files alive.

    Renaming a re-sent instance over its earlier copy made the kernel free the copy's blocks inside
    the rename: 0.3 ms of the 3 ms the receiver spends on an instance, while the sender waited.
    Held open across the rename, the old file is freed when its descriptor closes here, after the
    answer went out. A crash before that leaves it on the file system's orphan list, which the
    kernel clears when the volume is mounted again."""

    def __init__(self) -> None:
        self._fds: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._started = False
        self._guard = threading.Lock()

    def release(self, fd: int | None) -> None:
        if fd is None:
            return
        self._fds.put(fd)
        if not self._started:
            with self._guard:
                if not self._started:
                    threading.Thread(target=self._run, name="ldct-spool-release", daemon=True).start()
                    self._started = True

    def _run(self) -> None:
        while True:
            try:
                os.close(self._fds.get())
            except OSError:
                # Linux lets go of the descriptor even when close fails (EIO on NFS), and this one only
                # read a copy already replaced: nothing is lost, and the thread must live on.
                pass


@dataclass(frozen=True)
class SpooledInstance:
    series_uid: str
    sop_uid: str
    path: Path


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = root
        self.min_free_bytes = min_free_bytes
        # Closed to group and others (patient data), also when an earlier version made it with the umask.
        private_dir(root, tighten=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._releaser = Releaser()

    def series_lock(self, series_uid: str) -> threading.Lock:
        """Held while an instance of the series is written and recorded, and while retention removes
        the series, so a re-sent instance can never be deleted between its write and its commit."""
        with self._locks_guard:
            return self._locks.setdefault(series_uid, threading.Lock())

    def series_dir(self, series_uid: str) -> Path:
        if not is_valid_uid(series_uid):
            raise ValueError(f"not a valid DICOM UID: {series_uid!r}")
        return self.root / series_uid

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        if not is_valid_uid(sop_uid):
            raise ValueError(f"not a valid DICOM UID: {sop_uid!r}")
        return self.series_dir(series_uid) / f"{sop_uid}{SUFFIX}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        return self.free_bytes() >= self.min_free_bytes

    def write_instance(self, series_uid: str, sop_uid: str, data: bytes) -> SpooledInstance:
        """Store one encoded instance durably; raises SpoolFull (nothing left behind) when there is no room."""
        if not self.has_room():
            raise SpoolFull(errno.ENOSPC, f"spool has less than {self.min_free_bytes} bytes free")
        self.path_for(series_uid, sop_uid)  # a UID that is no DICOM UID is refused before anything is written
        return self.commit(self.stage(data), series_uid, sop_uid)

    def stage(self, *parts: bytes) -> Staged:
        """Write the parts, one after the other, to a temporary file of the spool root and start their
        way to the disk, so that the caller can work on (parse) them meanwhile; commit or discard the
        result. Errors come out of commit."""
        try:
            fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.root)
        except OSError as exc:
            return Staged(None, error=exc)
        try:
            os.fchmod(fd, DATA_FILE_MODE)
            write_all(fd, parts)
            # On Linux this starts the writeback of the (dirty) pages now and returns; they stay cached.
            # Written back while the caller parses, a 0.5 MB file then takes commit's fsync about 0.2
            # instead of 0.6 ms. A thread of its own doing the fsync gained less: two GIL handovers.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            os.close(fd)
            Path(temp).unlink(missing_ok=True)
            return Staged(None, error=exc)
        return Staged(Path(temp), fd)

    def settle(self, staged: Staged) -> None:
        """Return once the staged bytes are on disk. Raises as commit does, the staged file discarded.

        Needs no series lock: associations settling at once share the file system's journal commits."""
        try:
            staged.sync()
        except BaseException as exc:
            self._failed(staged, exc)
            raise

    def commit(self, staged: Staged, series_uid: str, sop_uid: str) -> SpooledInstance:
        """Move a staged file to its place once it is on disk (settled here if not yet): after this returns
        it survives a power cut. Raises SpoolFull (nothing left behind) when the volume filled while it
        was written."""
        try:
            final = self.path_for(series_uid, sop_uid)
            staged.sync()
            if not final.parent.is_dir():
                private_dir(final.parent)
                # the new directory entry must itself be durable, or a power cut loses the whole series
                fsync_dir(self.root)
            replaced = open_existing(final)  # a re-sent instance's earlier copy: freed by the Releaser
            try:
                os.replace(staged.path, final)
            except BaseException:
                self._releaser.release(replaced)
                raise
            staged.path = None
        except BaseException as exc:
            self._failed(staged, exc)
            raise
        try:
            # the rename itself must reach the disk, or a crash can leave the series without the file
            fsync_dir(final.parent)
        finally:
            self._releaser.release(replaced)
        return SpooledInstance(series_uid, sop_uid, final)

    def _failed(self, staged: Staged, exc: BaseException) -> None:
        """Discard what a failed settle or commit leaves; a full volume raises SpoolFull instead of exc."""
        self.discard(staged)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SpoolFull(exc.errno, f"spool volume full: {exc.strerror}") from exc

    def discard(self, staged: Staged) -> None:
        """Remove a staged file that is not to be kept; nothing if none is left."""
        if staged.fd is not None:
            os.close(staged.fd)
            staged.fd = None
        if staged.path is not None:
            staged.path.unlink(missing_ok=True)
            staged.path = None

    def remove_series(self, series_uid: str) -> None:
        shutil.rmtree(self.series_dir(series_uid), ignore_errors=True)
        with self._locks_guard:
            self._locks.pop(series_uid, None)

    def scan(self) -> list[SpooledInstance]:
        """Every complete spooled instance; left-over temporary files of a crashed write are removed."""
        for path in self.root.iterdir():
            if path.name.startswith(TEMP_PREFIX) and path.is_file():
                path.unlink(missing_ok=True)
        found = []
        for series_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name)):
            for path in sorted(series_dir.iterdir()):
                if path.name.startswith(TEMP_PREFIX):
                    path.unlink(missing_ok=True)
                elif path.suffix == SUFFIX and is_valid_uid(path.stem):
                    found.append(SpooledInstance(series_dir.name, path.stem, path))
        return found

