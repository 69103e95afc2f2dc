"""The training data loader: raw or latent shards -> batches of one shape, resumable to the exact batch.

    loader = build_loader(cfg, rank, world_size)
    for batch in loader: ...                  # infinite, epoch after epoch (reshuffled with seed + epoch)
    ckpt["data"] = loader.state_dict()        # the position: (epoch, batches consumed), plus skip counters
    loader.load_state_dict(ckpt["data"])      # the next batch is the one an uninterrupted run would give

Batches of a rank's epoch plan (batch_plan.py) go round-robin to the reader workers: batch g of the stream
since the start position is built by worker g % num_workers, and torch's DataLoader returns workers' outputs
in that same round-robin order, so the stream is the plan, whatever the worker count.
A sample that fails to decode is dropped from its batch, named in the log and counted in loader.stats; a batch
whose samples all fail is skipped. Both are deterministic, so a resumed run skips the same samples. Data with no
usable sample stops the loader with one line (skip_guard.py) instead of skipping forever.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch_plan import epoch_plan
from .config import DataConfig
from .dataset_index import DatasetIndex, build_index
from .sample_decode import SampleError, collate, decode_latent, decode_raw
from .shard_format import read_members
from .skip_guard import SkipGuard

log = logging.getLogger(__name__)
_MAX_LOGGED_SKIPS = 100
_OPEN_FILES = 8


class _BatchStream(IterableDataset):
    """Runs in each reader worker (or in the main process with num_workers=0)."""

    def __init__(self, index: DatasetIndex, cfg: DataConfig, rank: int, world_size: int, start: tuple[int, int],
                 single_epoch: bool):
        self.index, self.cfg, self.rank, self.world_size = index, cfg, rank, world_size
        self.start, self.single_epoch = start, single_epoch
        self._files: OrderedDict = OrderedDict()

    def plan(self, epoch: int) -> list[list[int]]:
        c = self.cfg
        return epoch_plan(self.index, seed=c.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          batch_size=c.batch_size, shuffle=c.shuffle, buffer_size=c.shuffle_buffer,
                          drop_last=c.drop_last)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)   # workers are processes: one thread each avoids oversubscription
        epoch, first = self.start
        g = 0
        try:
            while True:
                plan = self.plan(epoch)
                if not plan and first == 0:
                    raise ValueError(f"data: rank {self.rank} of {self.world_size} has no batch in epoch {epoch} "
                                     f"({len(self.index)} samples in {len(self.index.shards)} shards)")
                for b in range(first, len(plan)):
                    if g % workers == worker:
                        yield self._batch(epoch, b, plan[b])
                    g += 1
                if self.single_epoch:
                    return
                epoch, first = epoch + 1, 0
        finally:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def _file(self, shard: int):
        f = self._files.pop(shard, None)
        if f is None:
            f = open(self.index.shards[shard], "rb")
            if len(self._files) >= _OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def _batch(self, epoch: int, b: int, sample_ids: list[int]) -> dict:
        decode = decode_raw if self.cfg.kind == "raw" else decode_latent
        good, skipped = [], []
        for sid in sample_ids:
            s = self.index.samples[sid]
            rng = np.random.default_rng([self.cfg.seed, epoch, sid, 0xC0]) if self.cfg.random_crop else None
            try:
                members = read_members(self._file(s.shard), s.ref)
                out = decode(s.ref.key, members, self.cfg, rng)
                got = tuple((out["video"] if self.cfg.kind == "raw" else out["latent"]).shape[1:])
                if got != tuple(s.shape):
                    raise SampleError(f"{s.ref.key}: decoded shape {got} differs from its metadata {s.shape}",
                                      "shape differs from metadata")
                good.append(out)
            except SampleError as e:
                skipped.append((s.ref.key, e.reason, str(e)))
            except (OSError, EOFError) as e:
                skipped.append((s.ref.key, "read error", f"{s.ref.key}: {e}"))
        batch = collate(good, self.cfg.kind, self.cfg.text_length) if good else {}
        batch["_pos"], batch["_skipped"] = (epoch, b), skipped
        return batch


class ShardLoader:
    """Iterable over batch dicts; see the module docstring. Also holds `stats` and `index`."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, shards=None, single_epoch: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.cfg, self.rank, self.world_size, self.single_epoch = cfg, rank, world_size, single_epoch
        self.index = build_index(cfg, cfg.shards if shards is None else shards)
        for err in self.index.errors:
            log.warning("data: %s", err)
        self.epoch, self.batch_in_epoch = 0, 0
        self.stats = {"batches": 0, "samples": 0, "skipped_corrupt": 0, "skipped_batches": 0,
                      "filtered_at_index": dict(self.index.filtered), "index_errors": list(self.index.errors),
                      "corrupt": []}

    # --- position ---
    def state_dict(self) -> dict:
        s = self.stats
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.cfg.seed,
                "rank": self.rank, "world_size": self.world_size, "num_samples": len(self.index),
                "batch_size": self.cfg.batch_size,
                "stats": {k: s[k] for k in ("batches", "samples", "skipped_corrupt", "skipped_batches")}}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("world_size", self.world_size), ("seed", self.cfg.seed), ("num_samples", len(self.index)),
                          ("batch_size", self.cfg.batch_size)):
            if key in sd and sd[key] != mine:
                raise ValueError(f"data state: saved {key}={sd[key]} but this run has {key}={mine}; the saved "
                                 "position only identifies a batch of the same plan (same data, seed, batch size "
                                 "and world size)")
        self.epoch, self.batch_in_epoch = int(sd["epoch"]), int(sd["batch_in_epoch"])
        self.stats.update(sd.get("stats", {}))

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        return len(self._stream((0, 0)).plan(self.epoch if epoch is None else epoch))

    # --- iteration ---
    def _stream(self, start: tuple[int, int]) -> _BatchStream:
        return _BatchStream(self.index, self.cfg, self.rank, self.world_size, start, self.single_epoch)

    def __iter__(self):
        stream = self._stream((self.epoch, self.batch_in_epoch))
        if self.cfg.num_workers > 0:
            source = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                prefetch_factor=self.cfg.prefetch_factor, pin_memory=self.cfg.pin_memory,
                                persistent_workers=False)
        else:
            source = stream
        guard = SkipGuard(self.cfg.max_consecutive_skips, (self.epoch, self.batch_in_epoch))
        for batch in source:
            epoch, b = batch.pop("_pos")
            skipped = batch.pop("_skipped")
            self.epoch, self.batch_in_epoch = epoch, b + 1
            self._count(skipped)
            guard.batch(epoch, b, len(batch.get("key", ())), skipped)
            if "key" not in batch:
                self.stats["skipped_batches"] += 1
                continue
            self.stats["batches"] += 1
            self.stats["samples"] += len(batch["key"])
            yield batch
        guard.end()
        if self.single_epoch:   # a finite pass: the next iteration starts over
            self.epoch, self.batch_in_epoch = 0, 0

    def _count(self, skipped: list[tuple[str, str, str]]) -> None:
        for key, reason, message in skipped:
            self.stats["skipped_corrupt"] += 1
            if len(self.stats["corrupt"]) < _MAX_LOGGED_SKIPS:
                self.stats["corrupt"].append((key, message))
            log.warning("data: skipped sample %s (%s)", message, reason)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> ShardLoader:
    """The training loader of this rank: infinite, shuffled per epoch, resumable via state_dict."""
    return ShardLoader(cfg, rank, world_size)


def build_validation_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1,
                            shards: str | list[str] | None = None) -> ShardLoader:
    """One pass over the held-out shards (cfg.val_shards, or `shards`) in fixed order: no shuffling, crops from
    frame 0; each iteration repeats the same batches."""
    spec = shards if shards is not None else cfg.val_shards
    if not spec:
        raise ValueError("data.val_shards: needs a directory, glob or brace pattern of held-out shards")
    val_cfg = replace(cfg, shards=spec, shuffle=False, random_crop=False)
    return ShardLoader(val_cfg, rank, world_size, single_epoch=True)
