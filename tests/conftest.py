import os

import pytest
import torch

# Small models: one intra-op thread is faster than two on this machine and keeps timings steady.
torch.set_num_threads(int(os.environ.get("SIGNALPROP_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
