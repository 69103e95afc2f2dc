"""Randomness of training that must replay exactly after a resume.

The noise, t and caption-dropout draws of a microbatch come from a generator seeded by (seed, data-parallel
rank, step, microbatch): a pure function of the position, so a resumed run draws the same numbers without
restoring any generator state, and ranks of one model-parallel group (same data) draw the same noise."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["step_generator", "seed_everything", "mix_seed"]
