"""Small builders the loop calls: the device, the autocast dtype, the training and held-out data.
(The model comes from runtime.py.) Training keeps fp32 master weights; bf16 is applied by autocast."""
from __future__ import annotations

import logging

import torch

from magi_train.config import MagiConfig, SyntheticDataConfig, TrainConfig

from .synthetic_batches import SyntheticBatches

log = logging.getLogger("magi_train")


def resolve_device(cfg: TrainConfig, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device: 'cuda' requested but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (precision auto|bf16), none on CPU unless bf16 is asked for explicitly."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_train_loader(cfg: MagiConfig, rank: int = 0, world_size: int = 1):
    """The infinite, resumable batch iterator of this rank (state_dict / load_state_dict)."""
    if isinstance(cfg.data, SyntheticDataConfig):
        return SyntheticBatches(cfg.data, cfg.model, rank, world_size)
    from magi_train.data import build_loader

    return build_loader(cfg.data, rank, world_size)


def build_validation_batches(cfg: MagiConfig, count: int, rank: int = 0, world_size: int = 1) -> list[dict]:
    """The first `count` held-out batches (the same ones at every evaluation); [] when there is no held-out data."""
    if isinstance(cfg.data, SyntheticDataConfig):
        val = SyntheticBatches(cfg.data, cfg.model, rank, world_size, split="val")
        return [val.batch(0, b) for b in range(min(count, val.batches_per_epoch))]
    if not cfg.data.val_shards:
        return []
    from magi_train.data import build_validation_loader

    out = []
    for batch in build_validation_loader(cfg.data, rank, world_size):
        out.append(batch)
        if len(out) >= count:
            break
    return out


__all__ = ["resolve_device", "autocast_dtype", "build_train_loader", "build_validation_batches"]
