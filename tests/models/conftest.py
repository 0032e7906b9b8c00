"""Fixtures for the model tests.

The tiny models here are far faster single-threaded: with several OpenMP threads on a busy
2-core machine, spin-waiting makes a 3 s overfitting test take over a minute.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
