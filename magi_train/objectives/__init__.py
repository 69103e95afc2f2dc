"""Training objectives behind one seam (base.py): `train.objective` names one of OBJECTIVES."""
from __future__ import annotations

from .base import ChunkLoss, Objective
from .flow_matching import FlowMatchingObjective


def _flow_matching(cfg, runtime, model):
    return FlowMatchingObjective(cfg.train.flow, cfg.model.chunk_width, runtime.env.device)


def _shortcut_distill(cfg, runtime, model):
    from .shortcut_distill import build_shortcut_distill   # late: it builds the teacher through the runtime

    return build_shortcut_distill(cfg, runtime, model)


# name -> builder(cfg, runtime, model) -> Objective; runtime builds frozen auxiliary models in the run's layout
OBJECTIVES = {"flow_matching": _flow_matching, "shortcut_distill": _shortcut_distill}


def build_objective(cfg, runtime, model) -> Objective:
    return OBJECTIVES[cfg.train.objective](cfg, runtime, model)


__all__ = ["Objective", "ChunkLoss", "OBJECTIVES", "build_objective", "FlowMatchingObjective"]
