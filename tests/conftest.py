"Shared pytest setup."
import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Small tensors: intra-op threads only contend for the shared CI cores (restored after each module)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
