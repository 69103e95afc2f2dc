"""Small builders the loop calls in order: device -> model -> freezing -> wrapping -> optimizer -> data.

Each is its own function so that magi_train.parallel can replace one (e.g. wrap_model with TP/FSDP, a sharded
loader) without touching the others. Training keeps fp32 master weights; bf16 is applied by autocast."""
from __future__ import annotations

import logging

import torch
from torch import nn

from magi_train.config import MagiConfig, ModelConfig, SyntheticDataConfig, TrainConfig
from magi_train.model import LayerSpec, MagiDiT, build_dit

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


def build_model(model_cfg: ModelConfig, device: torch.device, init_from: str | None = None,
                spec: LayerSpec | None = None) -> MagiDiT:
    """The DiT in fp32 on `device` with the given layer spec (None: local linears); from a MAGI-1 checkpoint when
    init_from is set (built on meta, then the checkpoint tensors are assigned: the random init never exists)."""
    if not init_from:
        return build_dit(model_cfg, spec=spec, device=device, dtype=torch.float32)
    from magi_train.model.checkpoint_io import load_magi_checkpoint

    model = build_dit(model_cfg, spec=spec, device="meta", dtype=torch.float32)
    try:
        where = load_magi_checkpoint(model, init_from, fp8=False)
    except (FileNotFoundError, ValueError) as e:   # missing files, or tensors that do not fit model.*
        raise ValueError(f"train.init_from: {e}") from None
    log.info("initialised from MAGI-1 checkpoint %s", where)
    return model.to(device=device, dtype=torch.float32)


def wrap_model(model: MagiDiT, cfg: TrainConfig) -> nn.Module:
    """Activation checkpointing, then torch.compile, per transformer block (parameter names keep their MAGI-1
    form: compile works in place, and the checkpoint wrapper's prefix is stripped by the state-dict helpers)."""
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl,
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        from magi_train.model.block import TransformerLayer

        apply_activation_checkpointing(
            model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, TransformerLayer))
    if cfg.compile:
        for layer in model.videodit_blocks.layers:
            layer.compile()
    return model


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


__all__ = ["resolve_device", "autocast_dtype", "build_model", "wrap_model", "build_train_loader",
           "build_validation_batches"]
