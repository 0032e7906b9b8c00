"""Diffusion tests run single-threaded: the ops are tiny, and on a busy 2-core machine extra
intra-op threads only add contention. The previous setting is restored after each module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
