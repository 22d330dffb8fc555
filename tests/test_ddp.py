"""Multi-process training: torchrun with 2 CPU processes (gloo) ends with identical replicas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ldct_node.net.model import TSCNetConfig
from tests.test_trainer import make_pairs, read_metrics, write_teacher

pytestmark = [pytest.mark.peers, pytest.mark.slow]

DDP_TIMEOUT_S = 240


def test_two_process_run_finishes_with_identical_replicas(tmp_path):
    pairs = make_pairs(tmp_path / "data")
    teacher = write_teacher(tmp_path / "teacher.safetensors", TSCNetConfig(width=4, num_dems=2))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "ldct_node.cli", "train", "student", "--teacher", str(teacher), "--data", str(pairs), "--out", str(out),
        "--epochs", "2", "--patch-size", "16", "--patches-per-epoch", "8", "--workers", "0", "--device", "cpu",
        "--log-level", "warning",
    ]
    # one thread per process: two processes share the test machine's cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((out / "last.json").read_text())
    replicas = card["training"]["replica_weights_sha256"]
    assert len(replicas) == 2 and replicas[0] == replicas[1]
    assert card["training"]["hardware"]["processes"] == 2
    # each rank draws half of the 8 patches with batch 2: 2 steps per epoch, 2 epochs, one metrics row each
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "best.json", "best.safetensors", "last.json", "last.safetensors", "last.state.pt", "metrics.csv"]
