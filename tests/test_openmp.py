"""Freeing the caller's OpenMP workers before the engine thread computes."""

import sys
import threading

import pytest
import torch

from qomni.engine.openmp import _pause_all, release_caller_threads


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="needs torch built with OpenMP on Linux")
def test_finds_the_loaded_runtime():
    assert _pause_all() is not None


def test_parallel_work_goes_on_after_release():
    x = torch.randn(512, 512)
    before, threads = x @ x, torch.get_num_threads()
    release_caller_threads()
    assert torch.equal(x @ x, before)  # the team comes back for the next parallel region
    assert torch.get_num_threads() == threads
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("y", x @ x))
    worker.start()
    worker.join()
    assert torch.allclose(out["y"], before)
