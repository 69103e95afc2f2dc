"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine/linear/constant LR schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from magi_train.config import OptimizerConfig, ScheduleConfig

# Parameters that take no weight decay: norms, biases, learnable RoPE bands, the null caption rows.
_NO_DECAY_SUFFIXES = ("bias", "rope.bands", "null_caption_embedding")


def _decays(name: str, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)


def _implementation(cfg: OptimizerConfig, params: list[torch.Tensor]) -> dict:
    impl = cfg.implementation
    on_gpu = all(p.device.type == "cuda" for p in params)
    if impl == "auto":
        impl = "fused" if on_gpu else "foreach"
    if impl == "fused" and not on_gpu:
        raise ValueError("train.optimizer.implementation: 'fused' needs every parameter on a GPU; use auto or foreach")
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[impl]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, allow_empty: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (requires_grad), weight decay on matrices only. allow_empty: a rank
    whose part of the model is all frozen (a pipeline stage) gets an AdamW over one empty placeholder, so the
    scheduler, checkpoints and the loop treat it like any other rank."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p) else no_decay).append(p)
    if not decay and not no_decay and allow_empty:
        device = next(model.parameters()).device
        no_decay = [nn.Parameter(torch.zeros(0, device=device))]
    if not decay and not no_decay:
        raise ValueError("train.trainable: no parameter is left to train (check train.trainable / train.frozen)")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **_implementation(cfg, decay + no_decay))


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the base lr for the update that follows `step` completed steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = cfg.decay_steps if cfg.decay_steps is not None else max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.decay == "linear":
        return 1.0 - (1.0 - lo) * progress
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


__all__ = ["build_optimizer", "build_lr_scheduler", "lr_factor"]
