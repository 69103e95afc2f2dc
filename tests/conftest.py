import os

import pytest
import torch

# Tests compare numbers: keep fp32 matmuls exact-ish and threads few (CI has 2 cores, several workers may run).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_cfg():
    from magi_train.config import model_preset

    return model_preset("tiny")


def randomize_(model, std=0.1, seed=0):
    """Give every parameter non-trivial values (init zeros the final linear; tests need signal everywhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float8_e4m3fn:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
