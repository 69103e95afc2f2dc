"""Train the small VAE: reconstruction (MSE + L1) + KL, optionally a perceptual term from a local network.
(architecture="patch" has no network: its per-channel offset is set to the training clips' mean instead.)

Clips come from a folder of videos, webdataset shards holding videos, or the synthetic world; a few clips are
held out and the PSNR of encode -> decode on them (whole clips, through the public encode/decode) is the
reported quality. At the end the latent scale factor is set so that scaled latents have unit std, and the
model is saved atomically with save_pretrained.
"""
from __future__ import annotations

import math
import os
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .vae_small import SmallVAE, SmallVAEArch, load_small_vae

VIDEO_EXTS = ("mp4", "webm", "mov", "mkv", "avi")


@dataclass
class VAETrainConfig:
    out: str                               # directory the trained model is saved to
    data: Optional[str] = None             # folder of videos and/or .tar shards, a .tar, or a comma-separated list
    synthetic: int = 0                     # > 0: train on this many synthetic-world clips instead of `data`
    synthetic_size: int = 64               # synthetic frame height and width
    synthetic_frames: int = 24
    val_clips: int = 8                     # clips held out for PSNR (from `data`: the last ones in sorted order)
    max_clips: int = 2000                  # clips read from `data`
    max_frames: int = 64                   # frames read per clip
    resize: Optional[int] = None           # scale clips so the shorter side has this many pixels
    steps: int = 3000
    max_seconds: Optional[float] = None    # stop earlier when this much training time has passed
    batch_size: int = 16
    frames: Optional[int] = None           # frames per training sample; None: temporal factor (x3 with mixing)
    crop: int = 32                         # random square crop (convs are local: small crops train fastest)
    lr: float = 4e-3
    kl_weight: float = 1e-4
    l1_weight: float = 1.0
    perceptual: Optional[str] = None       # TorchScript file: images [N, 3, H, W] in [-1, 1] -> features
    perceptual_weight: float = 0.1
    latent_channels: int = 8
    spatial_factor: int = 4
    temporal_factor: int = 1
    base_channels: int = 64
    blocks: int = 3
    temporal_mixing: bool = False
    architecture: str = "conv"             # conv: learned; patch: pixel unshuffle, latent_channels = 3 * factor^2
    init_from: Optional[str] = None        # continue from a saved small VAE instead of a new one
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data and self.synthetic <= 0:
            raise ValueError("vae_train.data: give a folder/shards of videos, or synthetic > 0")
        for name in ("val_clips", "steps", "batch_size", "crop", "max_clips", "max_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vae_train.{name}: must be > 0, got {getattr(self, name)}")
        if self.crop % self.spatial_factor:
            raise ValueError(f"vae_train.crop: must be a multiple of spatial_factor={self.spatial_factor}, "
                             f"got {self.crop}")


# --- data ----------------------------------------------------------------------------------------------------

def _read_video(source, max_frames: int) -> np.ndarray:
    from magi_train.data.video_codec import read_video
    return read_video(source, max_frames=max_frames)[0]


def _video_sources(spec: str) -> list[tuple[str, Optional[str]]]:
    """(file, member) pairs: member is None for a plain video file, else the tar member name."""
    found = []
    for part in [p for p in spec.split(",") if p]:
        if not os.path.exists(part):
            raise FileNotFoundError(f"vae_train.data: not found: {part}")
        files = [part] if os.path.isfile(part) else sorted(
            os.path.join(root, f) for root, _, names in os.walk(part) for f in names)
        for path in files:
            ext = path.rsplit(".", 1)[-1].lower()
            if ext == "tar":
                with tarfile.open(path) as tar:
                    found += [(path, m.name) for m in tar.getmembers()
                              if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS]
            elif ext in VIDEO_EXTS:
                found.append((path, None))
    if not found:
        raise FileNotFoundError(f"vae_train.data: no videos ({', '.join(VIDEO_EXTS)}) or shards in {spec}")
    return found


def _resize_short_side(frames: np.ndarray, short: int, multiple: int) -> np.ndarray:
    t, h, w, _ = frames.shape
    scale = short / min(h, w)
    size = tuple(max(multiple, round(n * scale / multiple) * multiple) for n in (h, w))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="area" if scale < 1 else "bilinear")
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def load_video_clips(cfg: VAETrainConfig) -> list[np.ndarray]:
    sources = _video_sources(cfg.data)[: cfg.max_clips]
    clips = []
    open_tars: dict[str, tarfile.TarFile] = {}
    try:
        for path, member in tqdm(sources, desc="reading clips", unit="clip", disable=not cfg.progress):
            if member is None:
                frames = _read_video(path, cfg.max_frames)
            else:
                tar = open_tars.setdefault(path, tarfile.open(path))
                frames = _read_video(tar.extractfile(member).read(), cfg.max_frames)
            if cfg.resize:
                frames = _resize_short_side(frames, cfg.resize, cfg.spatial_factor)
            clips.append(frames)
    finally:
        for tar in open_tars.values():
            tar.close()
    return clips


def synthetic_clips(count: int, size: int, frames: int, seed: int) -> list[np.ndarray]:
    from data_tools.synthetic_world import WorldConfig, clip_seed, generate_clip  # only the demo needs it
    world = WorldConfig(height=size, width=size, num_frames=frames)
    return [generate_clip(world, clip_seed(seed, i)).frames for i in range(count)]


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def sample_batch(clips: list[np.ndarray], batch: int, frames: int, crop: int, multiple: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """Random clips, start frames, square crops and horizontal flips: [B, 3, frames, S, S] in [-1, 1]."""
    out = []
    for _ in range(batch):
        clip = clips[rng.integers(len(clips))]
        t, h, w, _ = clip.shape
        size_h = min(crop, h // multiple * multiple)
        size_w = min(crop, w // multiple * multiple)
        t0 = rng.integers(max(t - frames, 0) + 1)
        y0, x0 = rng.integers(h - size_h + 1), rng.integers(w - size_w + 1)
        piece = clip[t0:t0 + frames, y0:y0 + size_h, x0:x0 + size_w]
        if piece.shape[0] < frames:  # a clip shorter than a sample: repeat its last frame
            piece = np.concatenate([piece, np.repeat(piece[-1:], frames - piece.shape[0], axis=0)])
        if rng.random() < 0.5:
            piece = piece[:, :, ::-1]
        out.append(to_model_range(np.ascontiguousarray(piece)))
    sizes = {tuple(x.shape) for x in out}
    if len(sizes) > 1:  # clips of different sizes: cut all to the smallest
        hmin, wmin = min(s[2] for s in sizes), min(s[3] for s in sizes)
        out = [x[:, :, :hmin, :wmin] for x in out]
    return torch.stack(out)


# --- quality --------------------------------------------------------------------------------------------------

def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1], on the [0, 1] scale."""
    mse = F.mse_loss((reconstruction.float() + 1) / 2, (target.float() + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate_psnr(model: SmallVAE, clips: list[np.ndarray]) -> float:
    """Mean PSNR of whole held-out clips through encode -> decode (frames cut to a multiple of the spatial factor)."""
    model.eval()
    scores = []
    for clip in clips:
        t, h, w, _ = clip.shape
        sf = model.spatial_factor
        video = to_model_range(clip[:, : h // sf * sf, : w // sf * sf])[None]
        reconstruction = model.decode(model.encode(video), num_frames=t)
        scores.append(psnr(reconstruction, video))
    model.train()
    return float(np.mean(scores))


@torch.no_grad()
def measure_scale_factor(model: SmallVAE, clips: list[np.ndarray], limit: int = 32) -> float:
    """1 / std of the latent means over (up to `limit`) training clips: scaled latents get unit std."""
    model.eval()
    latents = []
    for clip in clips[:limit]:
        sf = model.spatial_factor
        h, w = clip.shape[1] // sf * sf, clip.shape[2] // sf * sf
        mean, _ = model.encode_moments(model._check_video(to_model_range(clip[:, :h, :w])[None]))
        latents.append(mean.flatten())
    model.train()
    return float(1.0 / torch.cat(latents).std().clamp_min(1e-6))


@torch.no_grad()
def measure_patch_basis(model: SmallVAE, clips: list[np.ndarray], limit: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [3 f^2] and top latent_channels principal components [k, 3 f^2] of the f x f RGB blocks of (up to
    `limit`) training clips: what the patch VAE subtracts and projects onto."""
    sf = model.spatial_factor
    blocks = []
    for clip in clips[:limit]:
        h, w = clip.shape[1] // sf * sf, clip.shape[2] // sf * sf
        x = F.pixel_unshuffle(to_model_range(clip[:, :h, :w]).transpose(0, 1), sf)   # [T, C, h, w]
        blocks.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).double())
    data = torch.cat(blocks)
    mean = data.mean(0)
    _, _, components = torch.linalg.svd(data - mean, full_matrices=False)
    basis = components[: model.latent_channels]
    basis = basis * torch.where(basis.sum(1, keepdim=True) < 0, -1.0, 1.0)   # a fixed sign: same file every run
    return mean.float(), basis.float()


@torch.no_grad()
def object_signal(model, clips: list[np.ndarray], limit: int = 16) -> float:
    """How much the objects move the latent: the mean over frames and channels of the spatial standard deviation of
    the scaled latent inside one frame (the scale factor gives latents unit std over the training clips; objects
    on a near-uniform background are what varies inside a frame). A VAE whose latents collapse to the background
    scores ~0 (0.002 was seen, against 0.78 for a working one), and the DiT then cannot learn the objects."""
    stds = []
    for clip in clips[:limit]:
        sf = model.spatial_factor
        h, w = clip.shape[1] // sf * sf, clip.shape[2] // sf * sf
        z = model.encode(to_model_range(clip[:, :h, :w])[None].to(model.device))[0]   # [C, t, h, w]
        stds.append(z.std(dim=(2, 3)).mean())
    return float(torch.stack(stds).mean())


# --- training -------------------------------------------------------------------------------------------------

def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def _perceptual_loss(net, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    def feats(video):
        out = net(video.transpose(1, 2).flatten(0, 1))  # frames as images
        return out if isinstance(out, (list, tuple)) else [out]
    return sum(F.mse_loss(a, b) for a, b in zip(feats(reconstruction), feats(target)))


def train_vae(cfg: VAETrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.synthetic > 0:
        clips = synthetic_clips(cfg.synthetic, cfg.synthetic_size, cfg.synthetic_frames, cfg.seed)
        held_out = synthetic_clips(cfg.val_clips, cfg.synthetic_size, cfg.synthetic_frames, cfg.seed + 1_000_003)
    else:
        everything = load_video_clips(cfg)
        if len(everything) <= cfg.val_clips:
            raise ValueError(f"vae_train.val_clips: {cfg.val_clips} held-out clips leave none of the "
                             f"{len(everything)} clips found for training")
        clips, held_out = everything[: -cfg.val_clips], everything[-cfg.val_clips:]

    if cfg.init_from:
        model = load_small_vae(cfg.init_from)
    else:
        model = SmallVAE(SmallVAEArch(latent_channels=cfg.latent_channels, spatial_factor=cfg.spatial_factor,
                                      temporal_factor=cfg.temporal_factor, base_channels=cfg.base_channels,
                                      blocks=cfg.blocks, temporal_mixing=cfg.temporal_mixing,
                                      architecture=cfg.architecture))
    if model.arch.architecture == "patch":
        return _finish(model, cfg, clips, held_out, steps=0, seconds=0.0)
    model.train()
    perceptual = None
    if cfg.perceptual:
        if not os.path.isfile(cfg.perceptual):
            raise FileNotFoundError(f"vae_train.perceptual: not found: {cfg.perceptual}")
        perceptual = torch.jit.load(cfg.perceptual, map_location="cpu").eval()
        for p in perceptual.parameters():
            p.requires_grad_(False)
    frames = cfg.frames or model.temporal_factor * (3 if model.arch.temporal_mixing else 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = min(100, cfg.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 1.0) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))))

    start = time.monotonic()
    bar = tqdm(range(cfg.steps), desc="train vae", unit="step", disable=not cfg.progress)
    step = 0
    for step in bar:
        batch = sample_batch(clips, cfg.batch_size, frames, cfg.crop, model.spatial_factor, rng)
        reconstruction, mean, logvar = model(batch)
        reconstruction = reconstruction[:, :, : batch.shape[2]]
        mse = F.mse_loss(reconstruction, batch)
        loss = mse + cfg.l1_weight * F.l1_loss(reconstruction, batch) + cfg.kl_weight * _kl(mean, logvar)
        if perceptual is not None:
            loss = loss + cfg.perceptual_weight * _perceptual_loss(perceptual, reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{10 * math.log10(4.0 / max(mse.item(), 1e-12)):.1f}")
        if cfg.max_seconds is not None and time.monotonic() - start > cfg.max_seconds:
            break
    seconds = time.monotonic() - start
    bar.close()
    return _finish(model, cfg, clips, held_out, steps=step + 1, seconds=seconds)


def _finish(model: SmallVAE, cfg: VAETrainConfig, clips, held_out, steps: int, seconds: float) -> dict:
    """Offset (patch) and scale factor from the training clips, held-out scores, then save atomically."""
    if model.arch.architecture == "patch":
        model.codec.offset.data, model.codec.basis.data = measure_patch_basis(model, clips)
    model.scale_factor = measure_scale_factor(model, clips)
    held_out_psnr = evaluate_psnr(model, held_out)
    metrics = {"steps": steps, "seconds": round(seconds, 1), "held_out_psnr": round(held_out_psnr, 2),
               "held_out_clips": len(held_out), "train_clips": len(clips), "scale_factor": model.scale_factor,
               "object_signal": round(object_signal(model, held_out), 4)}
    model.save_pretrained(cfg.out, extra={"config": asdict(cfg), "metrics": metrics})
    return metrics
