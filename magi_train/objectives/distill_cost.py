"""What a shortcut_distill step costs beyond a flow-matching one: frozen copies held and forwards run
(magi_train.plan counts them). Per sample and step: the teacher's guidance passes (no grad), the target model's
two half steps (no grad), then the student's forward and backward (3 forwards)."""
from __future__ import annotations

from magi_train.training.flops import forward_flops


def teacher_forward_flops(cfg, latent_frames: int, latent_h: int, latent_w: int, caption_len: int,
                          cfg_number: int) -> float:
    """cfg 1: the text pass; 2: text + context; 3: + every chunk alone (the uncond pass)."""
    whole = forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len)
    passes = {1: 1, 2: 2, 3: 2}[cfg_number] * whole
    if cfg_number == 3:
        n = latent_frames // cfg.chunk_width
        passes += n * forward_flops(cfg, cfg.chunk_width, latent_h, latent_w, caption_len)
    return passes


def distill_step_flops(cfg, latent_frames: int, latent_h: int, latent_w: int, caption_len: int,
                       cfg_number: int = 3) -> float:
    """FLOPs of one sample's distillation step (no recompute counted, as train_flops)."""
    whole = forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len)
    return teacher_forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len, cfg_number) + 2 * whole + 3 * whole


def frozen_copies(target_model: str) -> int:
    """The teacher, and the EMA target when the coarse targets come from one."""
    return 1 + (target_model == "ema")


__all__ = ["teacher_forward_flops", "distill_step_flops", "frozen_copies"]
