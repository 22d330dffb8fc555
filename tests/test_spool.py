"""The spool writes each instance atomically, replaces re-sent ones, and refuses when full."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from ldct_node.node.spool import Releaser, Spool, SpoolFull, is_valid_uid

SERIES, SOP = "1.2.3.4", "1.2.3.4.5"


def test_instance_lands_under_series_and_sop_uid_with_exact_bytes(tmp_path):
    spool = Spool(tmp_path)
    spooled = spool.write_instance(SERIES, SOP, b"DICM-bytes")
    assert spooled.path == tmp_path / SERIES / f"{SOP}.dcm"
    assert spooled.path.read_bytes() == b"DICM-bytes"
    assert [p.name for p in (tmp_path / SERIES).iterdir()] == [f"{SOP}.dcm"]


def test_resent_instance_replaces_the_earlier_copy(tmp_path):
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"first")
    spool.write_instance(SERIES, SOP, b"second")
    assert [p.read_bytes() for p in (tmp_path / SERIES).iterdir()] == [b"second"]


def test_a_replaced_copy_is_handed_to_the_releaser_still_open_and_the_new_one_is_in_place(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(Releaser, "release", lambda self, fd: released.append(fd))
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"first")
    assert released == [None]  # nothing was replaced
    spool.write_instance(SERIES, SOP, b"second")
    fd = released[-1]
    try:
        assert os.pread(fd, 16, 0) == b"first"  # freed only when this closes, after the answer
    finally:
        os.close(fd)
    assert [p.read_bytes() for p in (tmp_path / SERIES).iterdir()] == [b"second"]


def test_replaced_copies_are_freed_soon_after(tmp_path):
    spool = Spool(tmp_path)
    for content in (b"one", b"two", b"three"):
        spool.write_instance(SERIES, SOP, content)

    def held_deleted() -> list[str]:
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except FileNotFoundError:
                pass  # the descriptor listdir itself used
        return [t for t in targets if t.startswith(str(tmp_path)) and t.endswith("(deleted)")]

    deadline = time.monotonic() + 5
    while held_deleted() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held_deleted() == []


def test_a_close_that_fails_does_not_stop_later_copies_being_freed(tmp_path, monkeypatch):
    close, closed = os.close, []

    def flaky_close(fd):
        closed.append(fd)
        close(fd)
        if len(closed) == 1:
            raise OSError(errno.EIO, "Input/output error")  # as NFS may report, after releasing fd

    monkeypatch.setattr(os, "close", flaky_close)
    releaser = Releaser()
    first, second = (os.open(tmp_path, os.O_RDONLY) for _ in range(2))
    releaser.release(first)
    releaser.release(second)
    deadline = time.monotonic() + 5
    while len(closed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert closed == [first, second]


def test_a_failed_rename_releases_the_copy_it_would_have_replaced(tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(Releaser, "release", lambda self, fd: released.append(fd))
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"first")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SpoolFull):
        spool.write_instance(SERIES, SOP, b"second")
    assert released[0] is None and released[1] is not None
    os.close(released[1])
    assert [p.read_bytes() for p in (tmp_path / SERIES).iterdir()] == [b"first"]


@pytest.mark.parametrize("uid", ["", "../etc", "1.2/3", "1.2.", "a.b", "1" * 65, "1..2"])
def test_uids_that_are_not_dicom_uids_never_become_paths(tmp_path, uid):
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError):
        Spool(tmp_path).write_instance(uid, SOP, b"x")
    with pytest.raises(ValueError):
        Spool(tmp_path).write_instance(SERIES, uid, b"x")


def test_below_min_free_bytes_refuses_and_writes_nothing(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 60)
    with pytest.raises(SpoolFull):
        spool.write_instance(SERIES, SOP, b"x")
    assert list((tmp_path / "spool").rglob("*")) == []


def test_disk_full_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    spool = Spool(tmp_path)
    with pytest.raises(SpoolFull):
        spool.write_instance(SERIES, SOP, b"x" * 1000)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_disk_full_while_staging_is_refused_at_commit_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", no_space)
    spool = Spool(tmp_path)
    staged = spool.stage(b"x" * 1000)
    assert list(tmp_path.rglob("*")) == []
    with pytest.raises(SpoolFull):
        spool.commit(staged, SERIES, SOP)
    assert list(tmp_path.rglob("*")) == []


def test_a_disk_full_at_settling_is_spool_full_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    spool = Spool(tmp_path)
    staged = spool.stage(b"x" * 1000)
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolFull):
        spool.settle(staged)
    assert list(tmp_path.rglob("*")) == []


def test_a_settled_instance_commits_without_syncing_again(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    staged = spool.stage(b"bytes")
    spool.settle(staged)
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)))
    spool.commit(staged, SERIES, SOP)
    assert synced == [True, True]  # the spool root's and the new series folder's, none of a file
    assert (tmp_path / SERIES / f"{SOP}.dcm").read_bytes() == b"bytes"


def test_scan_lists_complete_instances_and_drops_crashed_temp_files(tmp_path):
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"x")
    leftovers = [tmp_path / SERIES / ".incoming-abc", tmp_path / ".incoming-def"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    found = spool.scan()
    assert [(i.series_uid, i.sop_uid) for i in found] == [(SERIES, SOP)]
    assert not any(leftover.exists() for leftover in leftovers)


def test_a_staged_instance_is_in_its_place_only_once_committed(tmp_path):
    spool = Spool(tmp_path)
    staged = spool.stage(b"DICM-bytes")
    assert staged.path.parent == tmp_path and staged.path.read_bytes() == b"DICM-bytes"
    assert staged.path.stat().st_mode & 0o777 == 0o600
    spooled = spool.commit(staged, SERIES, SOP)
    assert spooled.path.read_bytes() == b"DICM-bytes"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [spooled.path]
    spool.discard(staged)  # after commit: nothing left to discard
    assert spooled.path.exists()


def test_a_discarded_instance_leaves_nothing(tmp_path):
    spool = Spool(tmp_path)
    spool.discard(spool.stage(b"x" * 1000))
    assert list(tmp_path.rglob("*")) == []


def test_a_staged_instance_under_a_uid_that_is_no_dicom_uid_is_refused_and_removed(tmp_path):
    spool = Spool(tmp_path)
    with pytest.raises(ValueError):
        spool.commit(spool.stage(b"x"), SERIES, "../etc")
    assert list(tmp_path.rglob("*")) == []


def test_remove_series_deletes_its_folder(tmp_path):
    spool = Spool(tmp_path)
    spool.write_instance(SERIES, SOP, b"x")
    spool.remove_series(SERIES)
    assert not (tmp_path / SERIES).exists()


def test_the_same_sop_instance_uid_in_two_series_is_two_files(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.write_instance("1.2.3", "1.1", b"first")
    second = spool.write_instance("4.5.6", "1.1", b"second")
    assert (first.path.read_bytes(), second.path.read_bytes()) == (b"first", b"second")
    assert {(i.series_uid, i.sop_uid) for i in spool.scan()} == {("1.2.3", "1.1"), ("4.5.6", "1.1")}


def test_staged_parts_are_written_whole_and_in_order_when_the_kernel_writes_a_little_at_a_time(tmp_path, monkeypatch):
    writev = os.writev

    def three_bytes_at_most(fd, buffers):
        return writev(fd, [bytes(b"".join(bytes(b) for b in buffers)[:3])])

    monkeypatch.setattr(os, "writev", three_bytes_at_most)
    spool = Spool(tmp_path)
    spooled = spool.commit(spool.stage(b"DICM", b"", b"-header", b"+data set"), SERIES, SOP)
    assert spooled.path.read_bytes() == b"DICM-header+data set"
