"""Randomness of training that must replay exactly after a resume.

The noise, t and caption-dropout draws of a microbatch come from a generator seeded by (seed, step, the
microbatch's slot in the one-process order): a pure function of the position, so a resumed run draws the same
numbers without restoring any generator state, ranks of one model-parallel group (same data) draw the same
noise, and a data-parallel run draws what one process with as many microbatches draws."""
from __future__ import annotations

import random

import numpy as np
import torch


def mix_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def step_generator(seed: int, dp_rank: int, step: int, micro: int, device) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(mix_seed(seed, dp_rank, step, micro))
    return g


def microbatch_generator(seed: int, step: int, micro: int, dp_rank: int, dp_size: int, device) -> torch.Generator:
    """The draws of microbatch `micro` of data-parallel rank `dp_rank` at `step`, keyed by its slot in the one-
    process order (micro * dp_size + dp_rank, the slot whose batch the rank reads): dp_size ranks with A
    microbatches draw what one process with dp_size * A microbatches draws. One process: (seed, 0, step, micro)."""
    return step_generator(seed, 0, step, micro * dp_size + dp_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["step_generator", "microbatch_generator", "seed_everything", "mix_seed"]
