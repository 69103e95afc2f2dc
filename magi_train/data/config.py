"""DataConfig: what the training data loader reads and how it batches it."""
from __future__ import annotations

from dataclasses import dataclass

from magi_train.errors import ConfigError, check, check_choice

KINDS = ("raw", "latent")


@dataclass
class DataConfig:
    kind: str = "latent"                 # "raw": video shards (make_shards); "latent": precomputed shards (precompute)
    shards: str | list[str] = ""         # a directory of *.tar, a glob, a brace pattern (shard-{000000..000009}.tar),
                                         # or a list of these
    val_shards: str | list[str] | None = None   # held-out shards for build_validation_loader
    batch_size: int = 1                  # samples per batch, per rank
    num_workers: int = 2                 # reader processes per rank (0 = read in the training process)
    shuffle: bool = True                 # shuffle shard order and samples each epoch (seeded by seed + epoch)
    shuffle_buffer: int = 256            # samples mixed at once within a rank's stream; <= 1 keeps stream order
    seed: int = 0
    resolution: tuple[int, int] | None = None   # raw only: (H, W) after resize-to-cover and centre crop;
                                                # None keeps each video's size (batches are bucketed by size)
    num_frames: int | None = None        # frames per sample, in the stream's units: video frames (raw) or latent
                                         # frames (latent); shorter samples are filtered out, longer ones cropped;
                                         # None keeps every sample's length (bucketed by length)
    frame_stride: int = 1                # raw only: keep every n-th video frame
    random_crop: bool = True             # temporal crop start drawn per sample and epoch (else from frame 0)
    drop_last: bool = False              # drop each epoch's incomplete batches (one per shape bucket)
    text_length: int | None = None       # latent only: pad/truncate caption tokens to this; None: longest in batch
    prefetch_factor: int = 2             # batches each worker prepares ahead
    pin_memory: bool = False
    max_consecutive_skips: int = 100     # stop (exit 6) when this many samples in a row cannot be used; 0 = stop
                                         # only when a whole epoch held no usable sample

    def __post_init__(self) -> None:
        check_choice(self.kind, "data.kind", KINDS)
        if self.shards is not None and not isinstance(self.shards, str):   # list, tuple, omegaconf ListConfig
            self.shards = [str(s) for s in self.shards]
        if self.val_shards is not None and not isinstance(self.val_shards, str):
            self.val_shards = [str(s) for s in self.val_shards]
        check(bool(self.shards), "data.shards", "needs a directory, glob or brace pattern of .tar shards")
        for name in ("batch_size", "frame_stride", "prefetch_factor"):
            _positive(getattr(self, name), f"data.{name}")
        for name in ("num_workers", "shuffle_buffer", "seed", "max_consecutive_skips"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"data.{name}",
                  f"must be an integer >= 0, got {v!r}")
        if self.resolution is not None:
            res = tuple(self.resolution)
            check(len(res) == 2 and all(isinstance(x, int) and x > 0 for x in res), "data.resolution",
                  f"must be null or [height, width] of positive integers, got {self.resolution!r}")
            check(self.kind == "raw", "data.resolution",
                  "applies to raw shards only; latent shards keep the size chosen at precompute (set it to null)")
            self.resolution = res
        if self.num_frames is not None:
            _positive(self.num_frames, "data.num_frames")
        if self.text_length is not None:
            _positive(self.text_length, "data.text_length")
        check(self.kind == "raw" or self.frame_stride == 1, "data.frame_stride",
              "applies to raw shards only (latent frames are already strided by the VAE)")


def _positive(v, field: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{field}: must be a positive integer, got {v!r}")
