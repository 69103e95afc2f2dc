"""The batch plan: which samples form which batch, for one rank and one epoch. A pure function of
(index, seed, epoch, rank, world_size, batch settings), computed from the index alone without reading data.

Because the plan is known in advance, the position in the stream is just (epoch, batches consumed): a resumed
run recomputes the plan and continues at that batch, identical to an uninterrupted run, whatever the number of
reader workers. Steps, per epoch:
1. shard order: shuffled with (seed, epoch) when shuffling, else stored order;
2. rank split: the samples in that shard order are cut into world_size contiguous, equal (+-1) slices, so a
   rank reads whole shards except at its two ends, and the ranks' slices are disjoint and cover everything;
3. shuffle buffer: the rank's stream passes a buffer of shuffle_buffer samples that emits a random member
   each time it is full (seeded by seed, epoch, rank) - the same locality as webdataset's shuffle;
4. buckets: samples are grouped by shape as they come; a bucket that reaches batch_size becomes a batch.
   At the end the incomplete buckets become smaller batches (or are dropped with drop_last).
"""
from __future__ import annotations

import numpy as np

from .dataset_index import DatasetIndex


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def rank_stream(index: DatasetIndex, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> list[int]:
    order = _rng(seed, epoch, 0x5A4D).permutation(len(index.shards)) if shuffle else range(len(index.shards))
    flat = [sid for shard in order for sid in index.shard_samples[shard]]
    n = len(flat)
    return flat[rank * n // world_size:(rank + 1) * n // world_size]


def shuffle_buffer(stream: list[int], size: int, rng: np.random.Generator) -> list[int]:
    if size <= 1:
        return list(stream)
    out, buf = [], []
    picks = rng.integers(0, size, len(stream))   # drawn up front: one vectorised call
    for item, j in zip(stream, picks):
        if len(buf) < size:
            buf.append(item)
            continue
        out.append(buf[j])
        buf[j] = item
    rng.shuffle(buf)
    return out + buf


def epoch_plan(index: DatasetIndex, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
               shuffle: bool, buffer_size: int, drop_last: bool) -> list[list[int]]:
    """Batches (lists of sample ids, all of one shape) of this rank for this epoch, in stream order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    stream = rank_stream(index, seed, epoch, rank, world_size, shuffle)
    if shuffle:
        stream = shuffle_buffer(stream, buffer_size, _rng(seed, epoch, rank, 0xB0F))
    batches: list[list[int]] = []
    open_buckets: dict[tuple, list[int]] = {}
    for sid in stream:
        bucket = open_buckets.setdefault(index.samples[sid].shape, [])
        bucket.append(sid)
        if len(bucket) == batch_size:
            batches.append(bucket)
            del open_buckets[index.samples[sid].shape]
    if not drop_last:
        batches += [b for b in open_buckets.values() if b]   # dicts keep first-seen order: deterministic
    return batches
