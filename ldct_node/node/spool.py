"""The spool: one file per received SOP instance, written so that a crash never leaves half a file.

Layout: ``<spool_dir>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. The path alone names the series
and the instance, so the queue can be rebuilt from the spool after a crash without parsing a
single file (see ``scan``). A file is written to a temporary name in the same directory, fsynced,
renamed over its final name and the directory fsynced: after ``write_instance`` returns the
instance survives a power cut, and a re-sent instance atomically replaces the earlier copy.
"""

from __future__ import annotations

import errno
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from ldct_node.durable import DATA_FILE_MODE, TEMP_PREFIX, atomic_write_bytes, fsync_dir, private_dir

# DICOM UIDs (PS3.5 §9): digits and dots, at most 64 characters. Checking this before a UID
# becomes a path component is what stops a hostile dataset writing outside the spool.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64
SUFFIX = ".dcm"


class SpoolFull(OSError):
    """The spool volume has less free space than the configured minimum, or ran out while writing."""


def is_valid_uid(uid: str) -> bool:
    return bool(uid) and len(uid) <= MAX_UID_LENGTH and bool(_UID.match(uid))


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
        final = self.path_for(series_uid, sop_uid)
        try:
            if not final.parent.is_dir():
                private_dir(final.parent)
                # the new directory entry must itself be durable, or a power cut loses the whole series
                fsync_dir(self.root)
            atomic_write_bytes(final, data, DATA_FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(exc.errno, f"spool volume full: {exc.strerror}") from exc
            raise
        return SpooledInstance(series_uid, sop_uid, final)

    def remove_series(self, series_uid: str) -> None:
        shutil.rmtree(self.series_dir(series_uid), ignore_errors=True)
        with self._locks_guard:
            self._locks.pop(series_uid, None)

    def scan(self) -> list[SpooledInstance]:
        """Every complete spooled instance; left-over temporary files of a crashed write are removed."""
        found = []
        for series_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and is_valid_uid(p.name)):
            for path in sorted(series_dir.iterdir()):
                if path.name.startswith(TEMP_PREFIX):
                    path.unlink(missing_ok=True)
                elif path.suffix == SUFFIX and is_valid_uid(path.stem):
                    found.append(SpooledInstance(series_dir.name, path.stem, path))
        return found

