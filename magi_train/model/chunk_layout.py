"""Which key chunks each query chunk may attend to: the one description every attention backend reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ChunkLayout:
    """Queries and keys are sequences of whole chunks (tokens_per_chunk tokens each), named by global chunk index.

    Query chunk i sees every key chunk whose index lies in [kv_start[i], kv_end[i]] (inclusive). Training uses
    q_chunks == kv_chunks; inference puts cached chunks in front of the window's chunks in kv_chunks."""

    tokens_per_chunk: int
    q_chunks: tuple[int, ...]
    kv_chunks: tuple[int, ...]
    kv_start: tuple[int, ...]
    kv_end: tuple[int, ...]

    def __post_init__(self):
        if not (len(self.q_chunks) == len(self.kv_start) == len(self.kv_end)):
            raise ValueError("ChunkLayout: q_chunks, kv_start and kv_end must have one entry per query chunk")
        if len(set(self.kv_chunks)) != len(self.kv_chunks):
            raise ValueError(f"ChunkLayout.kv_chunks: duplicate chunk index in {self.kv_chunks}")
        kv = set(self.kv_chunks)
        for q, s, e in zip(self.q_chunks, self.kv_start, self.kv_end):
            if not any(s <= c <= e for c in kv):
                raise ValueError(f"ChunkLayout: query chunk {q} sees no key chunk in [{s}, {e}] of {self.kv_chunks}")

    @staticmethod
    def causal(num_chunks: int, tokens_per_chunk: int, first_chunk: int = 0, cached_chunks: Sequence[int] = (),
               lookback: Sequence[int] | int | None = None) -> "ChunkLayout":
        """Chunk-causal layout of a window [first_chunk, first_chunk+num_chunks) after the given cached chunks.

        lookback[i] = how many chunks (itself included) query chunk i sees; None = the whole history."""
        q = tuple(range(first_chunk, first_chunk + num_chunks))
        cached = tuple(c for c in cached_chunks if c not in q)
        if isinstance(lookback, int):
            lookback = [lookback] * num_chunks
        starts = tuple(0 if lookback is None or lookback[i] <= 0 else max(0, c - lookback[i] + 1)
                       for i, c in enumerate(q))
        return ChunkLayout(tokens_per_chunk, q, cached + q, starts, q)

    @property
    def q_len(self) -> int:
        return len(self.q_chunks) * self.tokens_per_chunk

    @property
    def kv_len(self) -> int:
        return len(self.kv_chunks) * self.tokens_per_chunk

    def chunk_mask(self) -> torch.Tensor:
        """[n_q, n_kv] bool: query chunk may see key chunk."""
        kv = torch.tensor(self.kv_chunks)
        s = torch.tensor(self.kv_start)[:, None]
        e = torch.tensor(self.kv_end)[:, None]
        return (kv[None, :] >= s) & (kv[None, :] <= e)

    def dense_mask(self, device=None) -> torch.Tensor:
        """[q_len, kv_len] bool token mask."""
        m = self.chunk_mask()
        t = self.tokens_per_chunk
        return m.repeat_interleave(t, 0).repeat_interleave(t, 1).to(device)

    def kv_slices(self) -> list[tuple[int, int] | None]:
        """Per query chunk, the contiguous token slice of keys it sees, or None when the visible chunks are not
        contiguous in kv order (then backends fall back to a mask). Plain Python on the layout's tuples, so a
        compiled block folds it into constants instead of breaking its graph."""
        out = []
        t = self.tokens_per_chunk
        for s, e in zip(self.kv_start, self.kv_end):
            idx = [j for j, c in enumerate(self.kv_chunks) if s <= c <= e]
            if idx == list(range(idx[0], idx[-1] + 1)):
                out.append((idx[0] * t, (idx[-1] + 1) * t))
            else:
                out.append(None)
        return out
