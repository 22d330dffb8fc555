"""One node per data directory: a second `ldct-node serve` on a data directory that a running node
holds exits at once with one line and status 2, before it opens the spool or the queue database;
the lock dies with its process, kill -9 included, so a crash never blocks the restart."""

from __future__ import annotations

import fcntl
import os
import subprocess

import pytest

from ldct_node.node.daemon import LOCK_FILE, lock_data_dir
from tests import peers

SERVE_TIMEOUT_S = 120


def serve(config_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    return subprocess.run(peers.cli_command("serve", "--config", str(config_path)), capture_output=True, text=True,
                          env=env, timeout=SERVE_TIMEOUT_S)


def node_on(workdir, data_dir, weights) -> peers.Node:
    return peers.make_node(workdir, peers.node_tables(data_dir, peers.free_port(), peers.free_port(), weights))


@pytest.mark.peers
@pytest.mark.slow
def test_a_held_data_directory_is_refused_in_one_line_before_the_queue_is_opened(tmp_path, tiny_weights):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Another process's lock, as a running node holds it (flock conflicts between open files even
    # within one process, so holding it here is enough).
    with open(data_dir / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = serve(node_on(tmp_path / "second", data_dir, tiny_weights).config_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"ldct-node serve: error: another ldct-node is already serving data directory {data_dir} (pid 4242):"
        " stop it or use another storage.data_dir"
    ]
    assert sorted(p.name for p in data_dir.iterdir()) == [LOCK_FILE]  # no queue database, no spool
    assert (data_dir / LOCK_FILE).read_text() == "4242\n"  # the holder's pid is left alone


@pytest.mark.peers
@pytest.mark.slow
def test_a_second_node_is_refused_while_the_first_runs_and_a_killed_one_frees_the_directory(tmp_path, tiny_weights):
    data_dir = tmp_path / "data"
    first = node_on(tmp_path / "first", data_dir, tiny_weights).start()
    try:
        result = serve(node_on(tmp_path / "second", data_dir, tiny_weights).config_path)
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(result.stderr.splitlines()) == 1
        assert f"already serving data directory {data_dir} (pid {first.process.pid})" in result.stderr
        assert first.receiver_up()  # the refused one changed nothing for the running node
        first.kill()
        third = node_on(tmp_path / "third", data_dir, tiny_weights).start()
        try:
            assert (data_dir / LOCK_FILE).read_text() == f"{third.process.pid}\n"
        finally:
            assert third.stop() == 0, third.log_text()[-2000:]
    finally:
        first.kill()


def test_the_lock_names_this_process_and_is_free_again_once_closed(tmp_path):
    fd = lock_data_dir(tmp_path / "new" / "data")
    try:
        assert (tmp_path / "new" / "data" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)
    os.close(lock_data_dir(tmp_path / "new" / "data"))
