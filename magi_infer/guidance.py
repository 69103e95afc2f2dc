"""The velocity of one pipeline forward, with MAGI-1's classifier-free guidance.

Passes (MAGI-1 names):
  cond_pre_and_text  window with its history and the prompt                      (adaLN flag: kept)
  cond_pre           window with its history and the null prompt                  (flag: dropped)
  uncond             each chunk alone, null prompt, no history                    (flag: dropped)
cfg_number 3 uses all three, 2 the first two, 1 only the first. The first two run as one batch; the finished
chunk re-run at clean_t rides in front of the window and its K/V are written from the pass MAGI-1 writes from
(cond_pre for cfg 2/3, the only pass for cfg 1). Passes whose weight is zero for every chunk of the window
(MAGI-1's scales make text and uncond weights vanish for t >= 0.3) are skipped: the guided sum is unchanged
(their terms are multiplied by exactly 0); the uncond pass runs only for the chunks whose weight 1 - s_prev is not
zero. Which passes run is decided from the host copy of t, so no forward waits for the GPU.
Distilled models (cfg 1) get one more pass for a nearly clean oldest chunk: that chunk alone with the prompt,
blended as prev_chunks_scale * with-history + (1 - prev_chunks_scale) * alone."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from magi_train.diffusion.sampling import blend_prev_chunks, cfg_scales, combine_cfg

from .config import SamplerConfig
from .device_copy import to_device
from .kv_cache import InferenceKVCache


@dataclass
class WindowInput:
    """One forward's inputs: the clean chunk (if any) first, then the denoising chunks, oldest first."""

    x: torch.Tensor                   # [B, C, n_in * cw, H, W]
    t: torch.Tensor                   # [B, n_in]
    caption: torch.Tensor             # [B, n_in, L, D] (null caption for the clean chunk)
    caption_mask: torch.Tensor        # [B, n_in, L]
    first_chunk: int                  # global index of x's first chunk
    num_clean: int                    # 0 or 1 chunks re-run at clean_t in front
    lookback: list[int] | None        # per input chunk (itself included); None = whole history
    dt: torch.Tensor | None = None    # [B, n_in] step-size condition of distilled models
    t_host: torch.Tensor | None = None  # [n_in] the same t on the CPU (every batch row shares it); None: from t


def _forward(model, x, t, caption, mask, dropped, dt, *, offset, cache=None, write=False, lookback=None):
    return model(x, t, caption, mask, dropped, dt, chunk_offset=offset, kv_cache=cache, cache_write=write,
                 lookback=lookback)


def _alone(model, x, t, caption, mask, dropped, dt, cw, chunks: list[int] | None = None):
    """Every chunk of x (or the listed ones) as its own batch row, no history (MAGI-1's uncond and nearly-clean
    passes). Returns [B, C, len(chunks) * cw, H, W]."""
    B, n = t.shape
    xs = rearrange(x, "b c (n f) h w -> b n c f h w", n=n)
    if chunks is not None and chunks != list(range(n)):
        xs, t, caption, mask = xs[:, chunks], t[:, chunks], caption[:, chunks], mask[:, chunks]
        dt = None if dt is None else dt[:, chunks]
        n = len(chunks)
    v = _forward(model, xs.flatten(0, 1), t.reshape(B * n, 1), caption.flatten(0, 1)[:, None],
                 mask.flatten(0, 1)[:, None], dropped.repeat_interleave(n), None if dt is None else dt.reshape(B * n, 1),
                 offset=0)
    return rearrange(v, "(b n) c f h w -> b c (n f) h w", n=n)


@torch.no_grad()
def guided_velocity(model, inp: WindowInput, cache: InferenceKVCache | None, sampler: SamplerConfig) -> torch.Tensor:
    """Velocity of the denoising chunks [B, C, n * cw, H, W] (fp32); writes the clean chunk's K/V to the cache."""
    cw = model.cfg.chunk_width
    B, n_in = inp.t.shape
    nc = inp.num_clean
    write = tuple(range(inp.first_chunk, inp.first_chunk + nc))
    den = slice(nc * cw, None)
    t_den = inp.t[:, nc:]
    t_host = (inp.t_host if inp.t_host is not None else inp.t[0].cpu()).float()[nc:]
    null_emb, null_mask = model.null_caption(B, n_in, inp.caption.shape[2])
    null_emb, null_mask = null_emb.to(inp.caption), null_mask.to(inp.caption_mask.device)
    kept = torch.zeros(B, dtype=torch.bool, device=inp.t.device)

    if sampler.cfg_number == 1:
        with _writing(cache, write, None):
            v = _forward(model, inp.x, inp.t, inp.caption, inp.caption_mask, kept, inp.dt, offset=inp.first_chunk,
                         cache=cache, write=bool(write), lookback=inp.lookback)[:, :, den]
        if float(t_host[0]) > sampler.distill_nearly_clean_chunk_threshold:
            oldest = slice(nc, nc + 1)
            v_alone = _alone(model, inp.x[:, :, nc * cw:(nc + 1) * cw], inp.t[:, oldest], inp.caption[:, oldest],
                             inp.caption_mask[:, oldest], kept, None if inp.dt is None else inp.dt[:, oldest], cw)
            v = v.clone()
            v[:, :, :cw] = blend_prev_chunks(v[:, :, :cw], v_alone, sampler.prev_chunks_scale)
        return v

    s_prev, s_text = cfg_scales(t_host, sampler.cfg_t_range, sampler.prev_chunk_scales, sampler.text_scales)
    if sampler.cfg_number == 2:
        s_prev = torch.ones_like(s_prev)
    need_text = bool((s_text != 0).any())
    uncond_chunks = [i for i, s in enumerate(s_prev.tolist()) if s != 1] if sampler.cfg_number == 3 else []
    s_prev, s_text = to_device(s_prev, inp.t.device), to_device(s_text, inp.t.device)

    # cond_pre (null prompt, writes the cache) and, when it has weight, cond_pre_and_text in one batch
    rows = [(inp.caption, inp.caption_mask, kept)] if need_text else []
    rows.append((null_emb, null_mask, ~kept))
    nb = len(rows)
    cat = lambda a: a.repeat(nb, *([1] * (a.dim() - 1)))  # noqa: E731
    caption = torch.cat([r[0] for r in rows])
    mask = torch.cat([r[1] for r in rows])
    dropped = torch.cat([r[2] for r in rows])
    with _writing(cache, write, slice((nb - 1) * B, nb * B)):
        out = _forward(model, cat(inp.x), cat(inp.t), caption, mask, dropped, None if inp.dt is None else cat(inp.dt),
                       offset=inp.first_chunk, cache=cache, write=bool(write), lookback=inp.lookback)[:, :, den]
    v_ctx = out[(nb - 1) * B:]
    v_text = out[:B] if need_text else v_ctx  # weight s_text is 0 everywhere when skipped
    if sampler.cfg_number == 2:
        return combine_cfg(v_text, v_ctx, None, s_prev, s_text, cw)
    v_unc = v_ctx  # where the weight 1 - s_prev is 0, any finite value gives the same sum
    if uncond_chunks:
        alone = _alone(model, inp.x[:, :, den], t_den, null_emb[:, nc:], null_mask[:, nc:], ~kept,
                       None if inp.dt is None else inp.dt[:, nc:], cw, uncond_chunks)
        v_unc = v_ctx.clone()
        for j, c in enumerate(uncond_chunks):
            v_unc[:, :, c * cw:(c + 1) * cw] = alone[:, :, j * cw:(j + 1) * cw]
    return combine_cfg(v_text, v_ctx, v_unc, s_prev, s_text, cw)


class _writing:
    """cache.writing(...) when there is a cache and something to write, else nothing."""

    def __init__(self, cache, chunks, batch):
        self.ctx = cache.writing(chunks, batch) if cache is not None and chunks else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False
