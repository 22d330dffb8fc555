"""The CPU forward pass's freed feature maps are kept for reuse instead of going back to the kernel."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from ldct_node.net import allocator
from ldct_node.net.allocator import keep_freed_memory


def faults_of_a_fresh_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(16 << 20, dtype=np.float32)  # 64 MiB, like one of a batch's feature maps
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_block_is_reused_without_faulting_its_pages_in_again():
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    faults_of_a_fresh_block()
    # Given back to the kernel, the block faulted in again every time (hundreds of faults here).
    assert faults_of_a_fresh_block() < 50


def test_without_glibc_nothing_changes_and_nothing_fails(monkeypatch):
    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_libc)
    assert keep_freed_memory() is False
