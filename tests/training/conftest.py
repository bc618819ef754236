import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~8x faster than two
    oversubscribed ones. Restored afterwards, so no other test sees it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
