import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the zoo as `zoo`
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread():
    """Tiny models: a second OpenMP thread only adds synchronisation, which on a
    busy shared machine made these steps up to 100x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
