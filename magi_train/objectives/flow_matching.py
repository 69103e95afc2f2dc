"""train.objective=flow_matching: pre-training and fine-tuning (MAGI-1's velocity objective, diffusion/)."""
from __future__ import annotations

import torch

from magi_train.diffusion import FlowMatchingLoss, prepare_inputs
from magi_train.grad_accumulation import Microbatch


class FlowMatchingObjective:
    name = "flow_matching"

    def __init__(self, flow_cfg, chunk_width: int, device: torch.device):
        self.flow_cfg, self.chunk_width, self.device = flow_cfg, chunk_width, device
        self.loss = FlowMatchingLoss()

    def prepare(self, batch: dict, generator: torch.Generator, step: int) -> Microbatch:
        return prepare_inputs(batch, generator, self.flow_cfg, self.chunk_width, self.device)


__all__ = ["FlowMatchingObjective"]
