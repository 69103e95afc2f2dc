"""The chunk pipeline in latent space: one loop for T2V, I2V and V2V (they differ by Conditioning only).

ChunkGenerator holds the video latent, the KV cache and the schedule (magi_infer.scheduler); iterating it runs
every forward and yields each chunk the moment it is clean, so the caller can decode and stream it while the
rest is still being denoised. Encoders and files live in magi_infer.runner; this module needs only the DiT."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from magi_train.diffusion.context_encoding import context_dropped
from magi_train.diffusion.sampling import distill_dt_factors, euler_step, time_grid

from .conditioning import Conditioning
from .config import SamplerConfig
from .device_copy import to_device
from .guidance import WindowInput, guided_velocity
from .kv_cache import InferenceKVCache
from .scheduler import WindowStep, lookbacks, oldest_visible, prefix_lookback, window_schedule


@dataclass
class FinishedChunk:
    index: int                 # chunk index in the output (0 = first generated chunk)
    chunk: int                 # global chunk index in the latent video (prefix chunks included)
    frame_start: int           # global latent frame of latent[:, :, 0]
    latent: torch.Tensor       # [B, C, f, h, w]: the chunk's frames that belong to the output
    ready_s: float | None = None  # time.perf_counter() when its decoded pixels reached the host (MagiRunner.frames)


def set_null_caption_prefix(model, prefix: torch.Tensor | None) -> None:
    """Put MAGI-1's negative special tokens (NEG_PROMPT) in front of the null caption of every DiT in `model`."""
    from magi_train.model.dit import MagiDiT

    for m in model.modules():
        if isinstance(m, MagiDiT):
            m.null_caption_prefix = None if prefix is None else prefix.to(m.y_embedder.null_caption_embedding)


def caption_keys(caption_mask: torch.Tensor, null_tokens: int) -> int:
    """Caption tokens every pass needs: up to the last valid prompt token, and the null caption's first
    null_tokens. The keys after it are masked off in every pass (MAGI-1 pads captions to 800 tokens, prompts use
    tens), so cross-attention over only these gives the same result for a fraction of the work."""
    valid = caption_mask.bool().flatten(0, -2).any(dim=0).nonzero()
    last = int(valid[-1]) + 1 if len(valid) else 0
    return min(caption_mask.shape[-1], max(last, null_tokens))


def num_chunks_for(num_latent_frames: int, prefix_frames: int, chunk_width: int) -> int:
    """MAGI-1: the generated frames plus the prefix, rounded up to whole chunks."""
    return -(-(num_latent_frames + prefix_frames) // chunk_width)


class ChunkGenerator:
    def __init__(self, model, sampler: SamplerConfig, cond: Conditioning, num_chunks: int, latent_hw: tuple[int, int],
                 seed: int = 0, noise: torch.Tensor | None = None, device: torch.device | str | None = None):
        cfg = model.cfg
        self.model, self.sampler, self.cond = model, sampler, cond
        self.cw = cw = cfg.chunk_width
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.num_chunks = num_chunks
        P = cond.prefix_frames
        self.first_chunk = P // cw
        n_gen = num_chunks - self.first_chunk
        if cond.caption.shape[1] != n_gen:
            raise ValueError(f"conditioning: {cond.caption.shape[1]} chunk captions for {n_gen} generated chunks")
        if P > num_chunks * cw:
            raise ValueError(f"prefix: {P} latent frames do not fit in {num_chunks} chunks of {cw}")
        B, C = cond.batch, cfg.latent_channels
        h, w = latent_hw
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size {h}x{w} is not a multiple of model.patch_size={cfg.patch_size}")
        shape = (B, C, num_chunks * cw, h, w)
        if noise is None:  # drawn on the CPU so a seed gives the same video on every device
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        self.x = noise.to(self.device, torch.float32).clone()
        self.prefix = None if cond.prefix is None else cond.prefix.to(self.device, torch.float32)
        self._pin()
        # the grid lives on the host: which passes a forward needs and the trace are read from it, and each
        # forward's t and step sizes go up with queued copies (device_copy.py), so no step waits for the GPU
        self.t_grid_host = time_grid(sampler.num_steps, sampler.shift, sampler.time_schedule, sampler.shortcut_mode)
        self.t_grid = self.t_grid_host.to(self.device)
        self.dt_factors_host = distill_dt_factors(sampler.num_steps, sampler.shortcut_mode) if cfg.distill else None
        self.dt_factors = None if self.dt_factors_host is None else self.dt_factors_host.to(self.device)
        self.schedule = window_schedule(num_chunks, sampler.window_size, sampler.num_steps, self.first_chunk)
        self.cache = InferenceKVCache(offload=sampler.kv_offload)
        set_null_caption_prefix(model, cond.null_prefix)
        L = caption_keys(cond.caption_mask, cfg.null_caption_tokens)
        null_emb, null_mask = model.null_caption(B, self.first_chunk, L)
        # per global chunk: prefix chunks carry the null caption, generated chunks their prompt
        self.caption = torch.cat([null_emb.detach().float().to(self.device),
                                  cond.caption[:, :, :L].float().to(self.device)], 1)
        self.caption_mask = torch.cat([null_mask.to(self.device), cond.caption_mask[:, :, :L].bool().to(self.device)], 1)
        one_emb, one_mask = model.null_caption(B, 1, L)
        self._null = (one_emb.detach().float().to(self.device), one_mask.to(self.device))
        self._evict_from = self._eviction_points()
        self.trace: list[tuple[int, int, float, float]] = []   # (chunk, step, t_from, t_to) of every update
        self.forwards = 0

    # ------------------------------------------------------------------ pieces
    def _pin(self) -> None:
        if self.prefix is not None:
            self.x[:, :, : self.prefix.shape[2]] = self.prefix

    def _frames(self, first: int, count: int) -> slice:
        return slice(first * self.cw, (first + count) * self.cw)

    def _lookbacks(self, ws: WindowStep) -> list[int] | None:
        s = self.sampler
        return lookbacks(ws, s.num_steps, s.noise2clean_kvrange, s.clean_chunk_kvrange)

    def _eviction_points(self) -> list[int]:
        """For each forward, the oldest chunk any forward from it on can see (cached chunks before it are freed)."""
        points, low = [], None
        for ws in reversed(self.schedule):
            v = oldest_visible(ws, self._lookbacks(ws))
            low = v if low is None else min(low, v)
            points.append(low)
        return points[::-1]

    def _dt(self, steps: list[int], B: int) -> torch.Tensor | None:
        if self.dt_factors_host is None:
            return None
        return to_device(self.dt_factors_host[steps], self.device)[None].expand(B, -1)

    def window_input(self, ws: WindowStep) -> WindowInput:
        B = self.x.shape[0]
        chunks = ws.input_chunks
        first, n_in = chunks[0], len(chunks)
        nc = 0 if ws.clean_chunk is None else 1
        t_host = self.t_grid_host[list(ws.steps)]
        if nc:
            t_host = torch.cat([t_host.new_full((1,), self.sampler.clean_t), t_host])
        t = to_device(t_host, self.device)
        cap = self.caption[:, first:first + n_in].clone()
        mask = self.caption_mask[:, first:first + n_in].clone()
        if nc:  # the re-run finished chunk sees the null caption (MAGI-1)
            cap[:, :1], mask[:, :1] = self._null
        # the clean chunk takes the step-size condition of the chunk behind it (MAGI-1: one dt per forward)
        dt = self._dt(([ws.steps[0]] * nc) + list(ws.steps), B)
        return WindowInput(x=self.x[:, :, self._frames(first, n_in)], t=t[None].expand(B, -1), caption=cap,
                           caption_mask=mask, first_chunk=first, num_clean=nc, lookback=self._lookbacks(ws), dt=dt,
                           t_host=t_host)

    @torch.no_grad()
    def prefill(self) -> None:
        """V2V: the prefix's whole chunks, at clean_t with the null caption, write their K/V once (flagged as
        diffusion.context_encoding says for this cfg_number: the definition training uses)."""
        n = self.first_chunk
        if n == 0:
            return
        s = self.sampler
        B = self.x.shape[0]
        dropped = torch.full((B,), context_dropped(s.cfg_number), dtype=torch.bool, device=self.device)
        t = torch.full((B, n), s.clean_t, device=self.device)
        with self.cache.writing(range(n)):
            self.model(self.x[:, :, self._frames(0, n)], t, self.caption[:, :n], self.caption_mask[:, :n], dropped,
                       self._dt([0] * n, B), chunk_offset=0, kv_cache=self.cache, cache_write=True,
                       lookback=prefix_lookback(s.noise2clean_kvrange, s.clean_chunk_kvrange))
        self.forwards += 1

    def velocity(self, ws: WindowStep) -> torch.Tensor:
        """Guided velocity of ws's denoising chunks (and the clean chunk's K/V written to the cache)."""
        self.forwards += 1
        return guided_velocity(self.model, self.window_input(ws), self.cache, self.sampler)

    @torch.no_grad()
    def step(self, i: int) -> FinishedChunk | None:
        ws = self.schedule[i]
        self._pin()  # the release pads the prefix into every forward's input
        # named range: bench_infer's --profile finds each forward's kernels by it (no cost unless profiling)
        with torch.profiler.record_function(f"magi_forward stage={ws.stage} sub={ws.substep} in={len(ws.input_chunks)}"):
            v = self.velocity(ws)
        steps = list(ws.steps)
        t_now, t_next = self.t_grid_host[steps], self.t_grid_host[[s + 1 for s in steps]]
        span = self._frames(ws.chunks[0], len(ws.chunks))
        self.x[:, :, span] = euler_step(self.x[:, :, span], v, to_device(t_now, self.device),
                                        to_device(t_next, self.device), self.cw)
        if self.sampler.i2v_frame0 == "pinned":  # else the update moves the prefix frames too, as in the release
            self._pin()
        self.trace.extend((c, s, float(a), float(b)) for c, s, a, b in zip(ws.chunks, ws.steps, t_now, t_next))
        self.cache.evict_before(self._evict_from[i + 1] if i + 1 < len(self.schedule) else self.num_chunks)
        if ws.finishing is None:
            return None
        c = ws.finishing
        lo = c * self.cw
        if not self.cond.emit_prefix:
            lo = max(lo, self.cond.prefix_frames)
        return FinishedChunk(index=c - self.first_chunk, chunk=c, frame_start=lo,
                             latent=self.x[:, :, lo:(c + 1) * self.cw].clone())

    def __iter__(self) -> Iterator[FinishedChunk]:
        self.prefill()
        for i in range(len(self.schedule)):
            out = self.step(i)
            if out is not None:
                yield out

    @property
    def num_generated_chunks(self) -> int:
        return self.num_chunks - self.first_chunk


def generate_latents(model, sampler: SamplerConfig, cond: Conditioning, num_chunks: int, latent_hw: tuple[int, int],
                     seed: int = 0) -> torch.Tensor:
    """Whole latent video [B, C, T, h, w] of the emitted frames (convenience for tests and scripts)."""
    parts = [c.latent for c in ChunkGenerator(model, sampler, cond, num_chunks, latent_hw, seed=seed)]
    return torch.cat(parts, dim=2)
