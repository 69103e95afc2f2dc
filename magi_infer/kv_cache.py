"""The inference KV cache: the model's KVCache plus a write filter, batch selection, eviction and traffic stats.

The model writes K/V of every chunk of a forward that has cache_write=True. At inference only the chunk re-run
at clean_t belongs in the cache, and with CFG passes batched only the batch half of the pass that MAGI-1 lets
write (the null-caption pass for cfg 2/3). `writing(chunks, batch)` sets both for one forward."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from magi_train.model import KVCache


class InferenceKVCache(KVCache):
    def __init__(self, offload: bool = False):
        super().__init__(offload=offload)
        self._allowed: set[int] | None = None
        self._batch: slice | None = None
        self.bytes_written = 0      # moved into the cache (to CPU when offloading)
        self.bytes_read = 0         # moved back for attention
        self.peak_bytes = 0

    @contextmanager
    def writing(self, chunks, batch: slice | None = None):
        """Within the block, writes keep only `chunks` (global indices) and, if given, the batch rows `batch`."""
        prev = self._allowed, self._batch
        self._allowed, self._batch = set(chunks), batch
        try:
            yield self
        finally:
            self._allowed, self._batch = prev

    def write(self, layer: int, chunk_ids, k: torch.Tensor, v: torch.Tensor) -> None:
        chunk_ids = list(chunk_ids)
        if self._batch is not None:
            k, v = k[:, self._batch], v[:, self._batch]
        per = k.shape[0] // len(chunk_ids)
        keep = [i for i, c in enumerate(chunk_ids) if self._allowed is None or c in self._allowed]
        for i in keep:  # token slices: the base class's copy of each kept chunk is the only copy made
            super().write(layer, [chunk_ids[i]], k[i * per:(i + 1) * per], v[i * per:(i + 1) * per])
            self.bytes_written += 2 * per * k[0].numel() * k.element_size()
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def pieces(self, layer: int, chunk_ids, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        stored, rows = self._stored_batch(layer, chunk_ids), like.shape[1]
        if stored in (1, rows):  # the base class broadcasts a single stored sample to every row
            ks, vs = super().pieces(layer, chunk_ids, like)
            self.bytes_read += 2 * sum(k[:, :stored].numel() for k in ks) * like.element_size()
            return ks, vs
        if rows % stored:
            raise ValueError(f"KV cache: stored batch {stored} does not divide the forward's batch {rows}")
        # CFG passes batched over several samples: each pass reuses the samples' stored K/V
        ks, vs = super().pieces(layer, chunk_ids, like[:, :stored])
        self.bytes_read += 2 * sum(k.numel() for k in ks) * like.element_size()
        return [k.repeat(1, rows // stored, 1, 1) for k in ks], [v.repeat(1, rows // stored, 1, 1) for v in vs]

    def _stored_batch(self, layer: int, chunk_ids) -> int:
        slot = self._store.get(layer, {})
        first = next((c for c in chunk_ids if c in slot), None)
        return slot[first][0].shape[1] if first is not None else 1  # missing: the base class names the chunk

    def evict_before(self, chunk: int) -> None:
        if chunk > 0:
            self.drop_before(chunk)

    def stats(self) -> dict:
        return {"offload": self.offload, "stored_bytes": self.nbytes(), "peak_bytes": self.peak_bytes,
                "bytes_written": self.bytes_written, "bytes_read": self.bytes_read}
