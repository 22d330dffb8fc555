"""Patient data on the host: whatever the umask (0022 outside systemd), everything the node creates in its
data directory is the service user's alone: folders 0700, files 0600 (spool, outbox, queue database with
its -wal/-shm, lock file), and folders or files an earlier version left with the umask are closed at start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ldct_node import durable
from ldct_node.config import Config, HttpSettings, QueueSettings, ReceiveSettings, StorageSettings
from ldct_node.dicom.derive import write_dataset
from ldct_node.node.daemon import LOCK_FILE, Node, lock_data_dir
from ldct_node.node.jobs import SeriesState
from tests.synthetic import ct_series
from tests.test_daemon import wait_state


@pytest.fixture(autouse=True)
def permissive_umask(monkeypatch):
    """The umask of a login shell; durable reads it once at import, so it is set there too."""
    old = os.umask(0o022)
    monkeypatch.setattr(durable, "_UMASK", 0o022)
    yield
    os.umask(old)


class WritingProcessor:
    """Writes each source's dataset back as its 'derived' file with the node's real writer."""

    def output_series_uid(self, series_uid: str) -> str:
        return f"{series_uid}.9"

    def denoise(self, sources, out_dir, progress):
        import pydicom

        files = []
        for source in sources:
            files.append(out_dir / f"{source.stem}.9.dcm")
            write_dataset(pydicom.dcmread(source), files[-1])
        progress(len(files), len(sources))
        return type("Result", (), {"derived_series_uid": f"{sources[0].parent.name}.9", "files": files,
                                   "skipped": [], "seconds": 0.1})


def config(data_dir: Path) -> Config:
    return Config(receive=ReceiveSettings(port=0, min_free_bytes=0),
                  queue=QueueSettings(quiet_period_s=0.2, poll_interval_s=0.05, stop_timeout_s=10),
                  storage=StorageSettings(data_dir=data_dir, keep_days=1), http=HttpSettings(enabled=False))


def modes(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of root and everything under it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def store(node: Node, count: int) -> str:
    datasets = ct_series(count, rows=16, columns=16)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.receiver.port, ae_title=node.cfg.receive.ae_title)
    assert assoc.is_established
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * count
    assoc.release()
    return str(datasets[0].SeriesInstanceUID)


def test_everything_the_node_creates_is_closed_to_group_and_others(tmp_path):
    top = tmp_path / "srv"  # the data directory and its missing parents are all made by the node
    data_dir = top / "ldct" / "data"
    lock = lock_data_dir(data_dir)
    node = Node(config(data_dir), WritingProcessor())
    node.start()
    try:
        series_uid = store(node, 3)
        wait_state(node.queue, series_uid, SeriesState.DONE)  # no destination: kept in the outbox
        found = modes(top)
        # While the queue is open, SQLite's write-ahead log and shared memory exist next to it.
        assert {"ldct/data/queue.sqlite3-wal", "ldct/data/queue.sqlite3-shm", f"ldct/data/{LOCK_FILE}"} <= set(found)
        assert sum(name.endswith(".dcm") and "/spool/" in f"/{name}" for name in found) == 3
        assert sum(name.endswith(".dcm") and "/outbox/" in f"/{name}" for name in found) == 3
    finally:
        node.stop()
        os.close(lock)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o700 if (top / name).is_dir() else 0o600)}
    assert wrong == {}


def test_folders_and_files_an_earlier_version_left_open_are_closed_at_start(tmp_path):
    data_dir = tmp_path / "data"
    for folder in (data_dir / "spool" / "1.2", data_dir / "outbox"):
        folder.mkdir(parents=True, mode=0o755)
    for name in ("queue.sqlite3", "queue.sqlite3-wal", LOCK_FILE):
        (data_dir / name).write_bytes(b"")
        (data_dir / name).chmod(0o644)
    data_dir.chmod(0o750)  # e.g. systemd's StateDirectoryMode: the operator's choice, left alone
    lock = lock_data_dir(data_dir)
    node = Node(config(data_dir), WritingProcessor())
    try:
        found = modes(data_dir)
        assert found["."] == 0o750
        assert (found["spool"], found["outbox"]) == (0o700, 0o700)
        assert (found["queue.sqlite3"], found[LOCK_FILE]) == (0o600, 0o600)
    finally:
        node.queue.close()
        os.close(lock)


def test_derived_files_written_outside_the_node_keep_ordinary_permissions(tmp_path):
    """`ldct-node denoise` writes into a folder the user chose: the folder decides, not the node."""
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    write_dataset(ct_series(1, rows=16, columns=16)[0], folder / "a.dcm")
    assert stat.S_IMODE((folder / "a.dcm").stat().st_mode) == 0o644
    private = durable.private_dir(tmp_path / "private")
    write_dataset(ct_series(1, rows=16, columns=16)[0], private / "a.dcm")
    assert stat.S_IMODE((private / "a.dcm").stat().st_mode) == 0o600
