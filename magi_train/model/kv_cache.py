"""Per-layer K/V of finished chunks, keyed by global chunk index, so a window attends to its history."""
from __future__ import annotations

import torch


class KVCache:
    """Stores post-norm, post-RoPE keys and values [tokens, B, heads, head_dim] per (layer, chunk).

    offload=True keeps them in (pinned, where CUDA exists) CPU memory and copies them back on read."""

    def __init__(self, offload: bool = False):
        self.offload = offload
        self._store: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}

    def chunks(self, layer: int = 0) -> list[int]:
        return sorted(self._store.get(layer, {}))

    def write(self, layer: int, chunk_ids, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [len(chunk_ids)*T, B, H, D] in chunk order."""
        per = k.shape[0] // len(chunk_ids)
        slot = self._store.setdefault(layer, {})
        for i, c in enumerate(chunk_ids):
            kc, vc = k[i * per:(i + 1) * per].detach(), v[i * per:(i + 1) * per].detach()
            if self.offload:
                kc, vc = kc.to("cpu", copy=True), vc.to("cpu", copy=True)
                if torch.cuda.is_available():
                    kc, vc = kc.pin_memory(), vc.pin_memory()
            else:
                kc, vc = kc.clone(), vc.clone()
            slot[c] = (kc, vc)

    def read(self, layer: int, chunk_ids, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated K, V of the given chunks, on like's device and dtype, batch broadcast to like's batch."""
        slot = self._store.get(layer, {})
        missing = [c for c in chunk_ids if c not in slot]
        if missing:
            raise KeyError(f"KV cache: chunks {missing} of layer {layer} were never written")
        k = torch.cat([slot[c][0] for c in chunk_ids]).to(like.device, like.dtype, non_blocking=True)
        v = torch.cat([slot[c][1] for c in chunk_ids]).to(like.device, like.dtype, non_blocking=True)
        if k.shape[1] != like.shape[1]:
            k = k.expand(-1, like.shape[1], -1, -1)
            v = v.expand(-1, like.shape[1], -1, -1)
        return k, v

    def drop_before(self, chunk: int) -> None:
        """Free chunks no window can see any more."""
        for slot in self._store.values():
            for c in [c for c in slot if c < chunk]:
                del slot[c]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for slot in self._store.values() for k, _ in slot.values())
