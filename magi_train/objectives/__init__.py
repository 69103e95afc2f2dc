"""Training objectives behind one seam (base.py): `train.objective` names one of OBJECTIVES."""
from __future__ import annotations

from .base import ChunkLoss, Objective
from .flow_matching import FlowMatchingObjective


def _flow_matching(cfg, runtime, model):
    return FlowMatchingObjective(cfg.train.flow, cfg.model.chunk_width, runtime.env.device)


# name -> builder(cfg, runtime, model) -> Objective; runtime builds frozen auxiliary models in the run's layout
OBJECTIVES = {"flow_matching": _flow_matching}


def build_objective(cfg, runtime, model) -> Objective:
    return OBJECTIVES[cfg.train.objective](cfg, runtime, model)


__all__ = ["Objective", "ChunkLoss", "OBJECTIVES", "build_objective", "FlowMatchingObjective"]
