"""In-memory synthetic training data with the batch dict and resume interface of magi_train.data's loader.

Each sample is one of `num_patterns` smooth random patterns drifting across the frame (a different direction per
pattern) plus a little noise; its caption names the pattern and its caption embedding is that pattern's fixed
random embedding. So text actually predicts content and the model has something to learn, yet everything is
a deterministic function of (seed, sample index): a resumed run sees the same batches.

Data-parallel ranks split the one-process stream by batches, round-robin: rank r of W takes batches r, r+W,
r+2W, ... of each epoch's (shared) order. So W ranks with A microbatches a step see, microbatch for
microbatch, what one process with W*A microbatches sees (the training loop seeds the noise the same way)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from magi_train.config import ModelConfig, SyntheticDataConfig


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class SyntheticBatches:
    """Infinite iterator of batches for one rank: {latent [B,C,T,H,W], text_emb [B,L,D], text_mask [B,L],
    caption [str], key [str]}; state_dict()/load_state_dict() hold the position (epoch, batch in epoch)."""

    def __init__(self, cfg: SyntheticDataConfig, model_cfg: ModelConfig, rank: int = 0, world_size: int = 1,
                 split: str = "train"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.cfg, self.rank, self.world_size, self.split = cfg, rank, world_size, split
        self.channels = model_cfg.latent_channels
        self.text_dim = model_cfg.caption_channels
        self.num_samples = cfg.num_samples if split == "train" else cfg.val_num_samples
        self.seed = cfg.seed if split == "train" else cfg.seed + 7919
        whole_batches = self.num_samples // cfg.batch_size
        if whole_batches < world_size:
            raise ValueError(f"data.num_samples: {self.num_samples} samples make {whole_batches} batches of "
                             f"data.batch_size={cfg.batch_size}, fewer than the {world_size} data-parallel ranks")
        self.batches_per_epoch = whole_batches // world_size
        self.epoch, self.batch_in_epoch = 0, 0
        self._patterns = self._make_patterns()

    # --- content ---
    def _make_patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        g = _generator(c.seed, 1)
        coarse = torch.randn(c.num_patterns, self.channels, max(c.latent_height // 2, 1), max(c.latent_width // 2, 1),
                             generator=g)
        fields = F.interpolate(coarse, size=(c.latent_height, c.latent_width), mode="bilinear", align_corners=False)
        text = torch.randn(c.num_patterns, c.text_length, self.text_dim, generator=g)
        return fields, text

    def sample(self, index: int) -> dict:
        c = self.cfg
        fields, text = self._patterns
        k = index % c.num_patterns
        angle = 2 * math.pi * k / c.num_patterns
        dy, dx = round(math.sin(angle)), round(math.cos(angle))
        frames = [torch.roll(fields[k], shifts=(f * dy, f * dx), dims=(1, 2)) for f in range(c.latent_frames)]
        g = _generator(self.seed, 2, index)
        latent = torch.stack(frames, dim=1) + c.noise_level * torch.randn(
            self.channels, c.latent_frames, c.latent_height, c.latent_width, generator=g)
        length = max(c.text_length - k % max(c.text_length // 2, 1), 1)   # captions of different lengths
        mask = torch.arange(c.text_length) < length
        return {"latent": latent, "text_emb": text[k] * mask[:, None], "text_mask": mask,
                "caption": f"pattern {k} drifting", "key": f"{self.split}-{index:06d}"}

    # --- order ---
    def _epoch_order(self, epoch: int) -> list[int]:
        """Every sample index once, in this epoch's order (the same on every rank)."""
        order = list(range(self.num_samples))
        if self.cfg.shuffle and self.split == "train":
            order = torch.randperm(self.num_samples, generator=_generator(self.seed, 3, epoch)).tolist()
        return order

    def batch(self, epoch: int, b: int) -> dict:
        """This rank's batch b of `epoch`: batch b * world_size + rank of the one-process stream."""
        order = self._epoch_order(epoch)
        bs = self.cfg.batch_size
        g = b * self.world_size + self.rank
        samples = [self.sample(i) for i in order[g * bs:(g + 1) * bs]]
        out = {k: torch.stack([s[k] for s in samples]) for k in ("latent", "text_emb", "text_mask")}
        out.update({k: [s[k] for s in samples] for k in ("caption", "key")})
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        out = self.batch(self.epoch, self.batch_in_epoch)
        self.batch_in_epoch += 1
        return out

    # --- resume ---
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "num_samples": self.num_samples, "batch_size": self.cfg.batch_size}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("seed", self.seed), ("world_size", self.world_size), ("num_samples", self.num_samples),
                          ("batch_size", self.cfg.batch_size)):
            if sd.get(key, mine) != mine:
                raise ValueError(f"data state: saved {key}={sd[key]} but this run has {key}={mine}")
        self.epoch, self.batch_in_epoch = int(sd["epoch"]), int(sd["batch_in_epoch"])


__all__ = ["SyntheticBatches"]
