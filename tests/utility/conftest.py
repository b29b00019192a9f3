"""One torch thread for these tiny networks: on a shared 2-core machine, two OpenMP threads that wait for
each other make a 16^3 CNN step tens of times slower, and one thread is as fast when the machine is idle."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
