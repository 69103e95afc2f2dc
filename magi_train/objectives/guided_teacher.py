"""The teacher's guided velocity on a training sequence: MAGI-1's classifier-free guidance, the passes of
magi_infer.guidance on the whole sequence at once (no KV cache: chunk-causal attention gives each chunk the
same history a cache would).

  text     every chunk with its history and the prompt (clean context chunks as the flags say: the null caption)
  context  every chunk with its history and the null prompt
  uncond   every chunk alone, null prompt
  v = (1 - s_prev) uncond + (s_prev - s_text) context + s_text text, scales per chunk by t bin
      (diffusion.sampling.cfg_scales / combine_cfg, the functions magi_infer combines with)
cfg_number 2 drops the uncond pass (text-only CFG), 1 returns the text pass. Every pass runs on every rank
whatever the scales are: under FSDP all ranks must take part in each forward, and ranks hold different t."""
from __future__ import annotations

import torch
from einops import rearrange

from magi_train.diffusion.sampling import cfg_scales, combine_cfg


def _alone(model, x, t, caption, caption_mask, chunk_width: int, dt=None) -> torch.Tensor:
    """Every chunk as its own batch row with the null prompt and no history."""
    B, n = t.shape
    xs = rearrange(x, "b c (n f) h w -> (b n) c f h w", n=n)
    dropped = torch.ones(B * n, dtype=torch.bool, device=t.device)
    v = model(xs, t.reshape(B * n, 1), caption.repeat_interleave(n, dim=0),
              None if caption_mask is None else caption_mask.repeat_interleave(n, dim=0), dropped,
              None if dt is None else dt.reshape(B * n, 1))
    return rearrange(v, "(b n) c f h w -> b c (n f) h w", n=n)


@torch.no_grad()
def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                    caption_dropped: torch.Tensor, *, chunk_width: int, cfg_number: int, t_range, prev_scales,
                    text_scales, caption_null: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C, n*cw, H, W], t [B, n], caption [B, L, D] (one prompt a sample), caption_dropped / caption_null [B, n]
    (the text pass's flags: clean context chunks as diffusion.context_flags encodes them for cfg_number's serving).
    Returns the guided velocity [B, C, T, H, W] (fp32)."""
    B, n = t.shape
    v_text = model(x, t, caption, caption_mask, caption_dropped, caption_null=caption_null).float()
    if cfg_number == 1:
        return v_text
    v_ctx = model(x, t, caption, caption_mask, torch.ones(B, n, dtype=torch.bool, device=t.device)).float()
    s_prev, s_text = cfg_scales(t, t_range, prev_scales, text_scales)
    if cfg_number == 2:
        return combine_cfg(v_text, v_ctx, None, torch.ones_like(s_prev), s_text, chunk_width)
    v_unc = _alone(model, x, t, caption, caption_mask, chunk_width).float()
    return combine_cfg(v_text, v_ctx, v_unc, s_prev, s_text, chunk_width)


__all__ = ["guided_velocity"]
