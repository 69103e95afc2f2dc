"""Evaluation inside training (train.evaluation.*): every every_steps, the current EMA weights continue a few
held-out clips and the continuations are scored against the truth; the scores go to metrics.jsonl and wandb
(kind "eval") and the first clip is kept as a video (truth | generated) under {run}/evaluation/.

The continuation uses the training forward and the schedule functions shared with inference
(magi_train.diffusion.sampling): after prefix_chunks clean chunks, each following chunk starts from seeded noise
and takes num_steps Euler steps along time_grid, seeing the chunks before it clean (at flow.clean_t, with the null
caption when flow.null_caption_on_clean, as training and inference encode context). It is MAGI-1's sampler with a
window of one chunk and no guidance: a fixed yardstick to follow a run by, not the tuned inference path, whose
settings a sweep over exported checkpoints compares (python -m magi_eval)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from magi_train.config import ConfigError, MagiConfig
from magi_train.diffusion.sampling import euler_step, time_grid
from magi_train.evaluation.image_metrics import psnr_per_frame, ssim_per_frame

from .build import build_validation_batches
from .ema import EMA, clean_name
from magi_train.grad_accumulation import autocast_context

log = logging.getLogger("magi_train")


@torch.no_grad()
def continue_latent(model: nn.Module, latent: torch.Tensor, caption: torch.Tensor, caption_mask: torch.Tensor,
                    chunk_width: int, prefix_chunks: int, num_steps: int, shift: float, seed: int, clean_t: float,
                    null_caption_on_clean: bool, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """latent [B, C, T, H, W]: its first prefix_chunks chunks kept, the rest generated chunk by chunk."""
    cw = chunk_width
    B, C, T, H, W = latent.shape
    n = T // cw
    if not 0 < prefix_chunks < n:
        raise ConfigError(f"train.evaluation.prefix_chunks: must lie in [1, {n - 1}] for clips of {n} chunks, "
                          f"got {prefix_chunks}")
    device = latent.device
    grid = time_grid(num_steps, shift).to(device)
    g = torch.Generator().manual_seed(seed)
    x = latent.float().clone()
    for k in range(prefix_chunks, n):
        span = slice(k * cw, (k + 1) * cw)
        x[:, :, span] = torch.randn((B, C, cw, H, W), generator=g).to(device)
        t = torch.full((B, k + 1), clean_t, device=device)
        dropped = torch.zeros(B, k + 1, dtype=torch.bool, device=device)
        dropped[:, :k] = null_caption_on_clean
        for i in range(num_steps):
            t[:, k] = grid[i]
            with autocast_context(device, amp_dtype):
                v = model(x[:, :, :(k + 1) * cw], t, caption, caption_mask, dropped)
            x[:, :, span] = euler_step(x[:, :, span], v[:, :, span].float(), grid[i:i + 1], grid[i + 1:i + 2], cw)
    return x


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: EMA | None):
    """The EMA's weights in the model for the duration (the trained ones restored after); as is without EMA."""
    if ema is None:
        yield
        return
    params = {clean_name(n): p for n, p in model.named_parameters()}
    saved = {n: params[n].detach().clone() for n in ema.shadow}
    try:
        with torch.no_grad():
            for n, v in ema.shadow.items():
                params[n].copy_(v)
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


class PeriodicEvaluation:
    def __init__(self, cfg: MagiConfig, run_dir: Path, device: torch.device, amp_dtype, encode):
        e = cfg.train.evaluation
        self.cfg, self.e, self.device, self.amp_dtype = cfg, e, device, amp_dtype
        self.out_dir = Path(run_dir) / "evaluation"
        samples = []
        for batch in build_validation_batches(cfg, e.clips):
            batch = encode(batch)
            for i in range(batch["latent"].shape[0]):
                samples.append({k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)})
        self.samples = samples[:e.clips]
        if not self.samples:
            log.warning("train.evaluation.every_steps=%d but there is no held-out data (data.val_shards): no "
                        "evaluation", e.every_steps)
        self.vae = None
        if cfg.encoders.vae.path:
            from magi_train.encoders import build_vae

            self.vae = build_vae(cfg.encoders.vae).eval()
        elif e.video:
            log.warning("train.evaluation.video: encoders.vae.path is not set, so generated latents cannot be "
                        "decoded: scores are in latent space and no video is kept")

    def _decode(self, latent: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return _to_uint8(self.vae.decode(latent.to(self.vae.device))[0])

    def __call__(self, model: nn.Module, ema: EMA | None, step: int, logger) -> dict:
        if not self.samples:
            return {}
        e, flow = self.e, self.cfg.train.flow
        cw = self.cfg.model.chunk_width
        was_training = model.training
        model.eval()
        scores: dict[str, list[float]] = {"latent_mse": []}
        try:
            with ema_weights(model, ema):
                for i, s in enumerate(self.samples):
                    truth = s["latent"].to(self.device, torch.float32)
                    pred = continue_latent(model, truth, s["text_emb"].to(self.device), s["text_mask"].to(self.device), cw,
                                           e.prefix_chunks, e.num_steps, e.shift, e.seed + i, flow.clean_t,
                                           flow.null_caption_on_clean, self.amp_dtype)
                    future = slice(e.prefix_chunks * cw, None)
                    scores["latent_mse"].append(float((pred[:, :, future] - truth[:, :, future]).square().mean()))
                    if self.vae is not None:
                        self._score_pixels(pred, truth, i, step, scores, logger)
        finally:
            model.train(was_training)
        metrics = {k: float(np.mean(v)) for k, v in scores.items()}
        metrics["weights"] = "ema" if ema is not None else "trained"
        logger.log(step, metrics, kind="eval")
        return metrics

    def _score_pixels(self, pred, truth, i, step, scores, logger) -> None:
        p, t = self._decode(pred), self._decode(truth)
        F = len(t) - self.vae.video_frames(self.e.prefix_chunks * self.cfg.model.chunk_width)
        scores.setdefault("psnr", []).append(float(np.mean(psnr_per_frame(p[-F:], t[-F:]))))
        scores.setdefault("ssim", []).append(float(np.mean(ssim_per_frame(p[-F:], t[-F:]))))
        if i == 0 and self.e.video:
            from magi_train.data.video_codec import write_video

            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = write_video(self.out_dir / f"step_{step:08d}.mp4", np.concatenate([t, p], axis=2), self.e.fps)
            if getattr(logger, "wandb", None) is not None:
                try:
                    import wandb

                    logger.wandb.log({"eval/video": wandb.Video(str(path), format="mp4")}, step=step)
                except Exception as exc:   # wandb must never fail a training run
                    logger.write_line(f"wandb video log failed ({type(exc).__name__}: {exc})")


def build_periodic_eval(cfg: MagiConfig, run_dir: Path, device, amp_dtype, encode, parallel: bool
                        ) -> PeriodicEvaluation | None:
    """The evaluator when train.evaluation.every_steps > 0, else None."""
    if not cfg.train.evaluation.every_steps:
        return None
    if parallel:
        raise ConfigError("train.evaluation.every_steps: generation inside training runs in one-process training "
                          "only; evaluate the run's exports with python -m magi_eval instead")
    return PeriodicEvaluation(cfg, run_dir, device, amp_dtype, encode)


__all__ = ["continue_latent", "ema_weights", "PeriodicEvaluation", "build_periodic_eval"]
