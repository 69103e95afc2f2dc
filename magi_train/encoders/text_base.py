"""TextEncoder: the interface every caption encoder offers, with prompt caching and batching done once here."""
from __future__ import annotations

from collections import OrderedDict

import torch

from .caption_clean import clean_caption


class TextEncoder:
    """encode(prompts) -> (emb float32 [B, L, D], mask bool [B, L]); L = max_length, D = dim.

    Subclasses implement `_encode_batch(cleaned_prompts)`. Repeated prompts are served from an LRU cache and
    each distinct prompt of a call is encoded once."""

    def __init__(self, dim: int, max_length: int, device: str | torch.device, batch_size: int, cache_size: int,
                 clean_captions: bool):
        self.dim = dim
        self.max_length = max_length
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.clean_captions = clean_captions
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = 0

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def prepare(self, prompt: str) -> str:
        return clean_caption(prompt) if self.clean_captions else str(prompt)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, got a single string")
        keys = [self.prepare(p) for p in prompts]
        found = {k: self._cache_get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        self.cache_hits += len(keys) - len(missing)  # prompts served without a forward pass
        for start in range(0, len(missing), self.batch_size):
            part = missing[start:start + self.batch_size]
            emb, mask = self._encode_batch(part)
            for i, key in enumerate(part):
                found[key] = (emb[i].float(), mask[i].bool())
                self._cache_put(key, found[key])
        if not keys:
            return (torch.zeros(0, self.max_length, self.dim, device=self.device),
                    torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device))
        emb = torch.stack([found[k][0] for k in keys])
        mask = torch.stack([found[k][1] for k in keys])
        if device is not None:
            emb, mask = emb.to(device), mask.to(device)
        return emb, mask

    def _cache_get(self, key: str):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _cache_put(self, key: str, value) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()
