import os
from contextlib import contextmanager

import pytest
import torch

# Tests compare numbers: keep fp32 matmuls exact-ish and threads few (CI has 2 cores, several workers may run).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): one thread is as
    fast, and immune to spin-waiting when test processes share the cores."""
    with torch_threads(1):
        yield


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


def tiny_infer_dit(chunk_width: int):
    """The inference tests' model: the tiny preset with random weights everywhere, in eval mode."""
    from magi_train.config import model_preset
    from magi_train.model import build_dit

    torch.manual_seed(0)
    return randomize_(build_dit(model_preset("tiny", chunk_width=chunk_width)), std=0.1, seed=1).eval()


def random_captions(model, n, seed=0, batch=1):
    """n chunk captions of random embeddings, the first 10 tokens valid: ([batch, n, L, C], [batch, n, L])."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, n, cfg.caption_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(batch, n, cfg.caption_max_length, dtype=torch.bool)
    mask[..., :10] = True
    return emb, mask
