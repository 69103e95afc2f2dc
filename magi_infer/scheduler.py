"""The chunk scheduler: which chunks are in flight at each forward, at which denoising step, and what they see.

MAGI-1's pipelined denoising: a window of `window_size` chunks moves along the video. Each stage lasts
num_steps / window_size forwards; a chunk enters the window at one stage, advances one stage per stage, and
leaves after window_size stages with exactly num_steps updates, so the chunks in flight sit at staggered noise
levels (the oldest nearly clean, the newest nearly noise). At the first forward of a stage, the chunk that just
left is re-run once at t = clean_t with the null caption, in the same forward, and its K/V go into the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class WindowStep:
    """One forward of the pipeline."""

    stage: int
    substep: int                     # index of the forward inside its stage
    chunks: tuple[int, ...]          # denoising chunks (global indices), oldest first
    steps: tuple[int, ...]           # each chunk's denoising step in [0, num_steps), same order
    clean_chunk: int | None          # finished chunk re-run at clean_t in front of the window (writes its K/V)
    finishing: int | None            # chunk whose last update this forward makes

    @property
    def first_chunk(self) -> int:
        """Global index of the first chunk the forward's input holds (the clean chunk when there is one)."""
        return self.clean_chunk if self.clean_chunk is not None else self.chunks[0]

    @property
    def input_chunks(self) -> tuple[int, ...]:
        return ((self.clean_chunk,) if self.clean_chunk is not None else ()) + self.chunks


def check_schedule_args(num_chunks: int, window_size: int, num_steps: int, first_chunk: int = 0) -> None:
    if window_size <= 0:
        raise ValueError(f"window_size: must be a positive integer, got {window_size}")
    if num_steps <= 0 or num_steps % window_size:
        raise ValueError(f"num_steps: must be a positive multiple of window_size={window_size}, got {num_steps}")
    if not 0 <= first_chunk < num_chunks:
        raise ValueError(f"chunks: nothing to generate ({num_chunks} chunks, {first_chunk} of them given as prefix)")


def window_schedule(num_chunks: int, window_size: int, num_steps: int, first_chunk: int = 0) -> list[WindowStep]:
    """Every forward of a run generating chunks [first_chunk, num_chunks) (earlier ones are a cached prefix)."""
    check_schedule_args(num_chunks, window_size, num_steps, first_chunk)
    per_stage = num_steps // window_size
    stages = num_chunks - first_chunk + window_size - 1
    out = []
    for stage in range(stages):
        # chunk c is in its local stage (stage - (c - first_chunk)) while that lies in [0, window_size)
        chunks = [c for c in range(first_chunk, num_chunks) if 0 <= stage - (c - first_chunk) < window_size]
        for sub in range(per_stage):
            steps = tuple((stage - (c - first_chunk)) * per_stage + sub for c in chunks)
            clean = chunks[0] - 1 if sub == 0 and chunks[0] > first_chunk else None
            finishing = chunks[0] if steps[0] == num_steps - 1 else None
            out.append(WindowStep(stage, sub, tuple(chunks), steps, clean, finishing))
    return out


def lookbacks(step: WindowStep, num_steps: int, noise2clean_kvrange: Sequence[int],
              clean_chunk_kvrange: int) -> list[int] | None:
    """Chunks each input chunk of the forward sees (itself included), MAGI-1's rule; None = whole history.

    A denoising chunk in its q-th quarter (by its own step) sees noise2clean_kvrange[q] chunks; the clean chunk
    sees clean_chunk_kvrange (-1: the last noise2clean value). An empty noise2clean_kvrange means full history."""
    if not noise2clean_kvrange:
        return None
    ranges = list(noise2clean_kvrange)
    if num_steps % len(ranges):
        raise ValueError(f"noise2clean_kvrange: its length {len(ranges)} must divide num_steps={num_steps}")
    per_part = num_steps // len(ranges)
    clean_range = clean_chunk_kvrange if clean_chunk_kvrange != -1 else ranges[-1]
    out = [clean_range] if step.clean_chunk is not None else []
    return out + [ranges[s // per_part] for s in step.steps]


def prefix_lookback(noise2clean_kvrange: Sequence[int], clean_chunk_kvrange: int) -> int:
    """Look-back of cached prefix chunks (V2V), as MAGI-1: clean range, else last noise2clean value, else 8."""
    if clean_chunk_kvrange != -1:
        return clean_chunk_kvrange
    return noise2clean_kvrange[-1] if noise2clean_kvrange else 8


def oldest_visible(step: WindowStep, looks: list[int] | None) -> int:
    """Smallest chunk index this forward can attend to (0 when the history is unlimited)."""
    if looks is None:
        return 0
    return min(c - lb + 1 if lb > 0 else 0 for c, lb in zip(step.input_chunks, looks))
