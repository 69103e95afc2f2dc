"""Held-out loss at fixed noise levels: every chunk at t, the same noise at every evaluation, no caption
dropout and no clean prefix, so numbers of different steps (and runs) compare directly."""
from __future__ import annotations

import torch
from torch import nn

from magi_train.diffusion import ChunkNoise, loss_from_output, num_chunks_of, prepare_inputs

from .seeding import step_generator
from magi_train.grad_accumulation import autocast_context


@torch.no_grad()
def validate(model: nn.Module, batches: list[dict], flow_cfg, chunk_width: int, t_values: list[float], seed: int,
             device: torch.device, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """{'loss_t0.10': ..., ..., 'loss_mean': ...} averaged over `batches`."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    out = {}
    try:
        for t in t_values:
            losses = []
            for b, batch in enumerate(batches):
                B, n = batch["latent"].shape[0], num_chunks_of(batch["latent"], chunk_width)
                levels = ChunkNoise(t=torch.full((B, n), float(t), device=device),
                                    clean=torch.zeros(B, n, dtype=torch.bool, device=device))
                g = step_generator(seed, 0, 0, b, device)
                kwargs, target, weight = prepare_inputs(batch, g, flow_cfg, chunk_width, device,
                                                        noise_levels=levels, caption_dropout=0.0)
                with autocast_context(device, amp_dtype):
                    v = model(**kwargs)
                losses.append(float(loss_from_output(v.float(), target, weight)))
            out[f"loss_t{t:.2f}"] = sum(losses) / len(losses)
        out["loss_mean"] = sum(out.values()) / len(t_values)
    finally:
        model.train(was_training)
    return out


__all__ = ["validate"]
