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

    def read_before(self, layer: int, chunk_ids, k: torch.Tensor, v: torch.Tensor):
        """K, V of the cached chunk_ids followed by a forward's own k, v [S, B, H, D]: one concatenation, the only
        copy the history makes on its way to attention."""
        ks, vs = self.pieces(layer, chunk_ids, k)
        return torch.cat([*ks, k]), torch.cat([*vs, v])

    def pieces(self, layer: int, chunk_ids, like: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per chunk, K and V on like's device and dtype, batch broadcast (a view) to like's batch."""
        slot = self._store.get(layer, {})
        missing = [c for c in chunk_ids if c not in slot]
        if missing:
            raise KeyError(f"KV cache: chunks {missing} of layer {layer} were never written")
        ks, vs = [], []
        for c in chunk_ids:
            k, v = (x.to(like.device, like.dtype, non_blocking=True) for x in slot[c])
            if k.shape[1] != like.shape[1]:
                k, v = k.expand(-1, like.shape[1], -1, -1), v.expand(-1, like.shape[1], -1, -1)
            ks.append(k)
            vs.append(v)
        return ks, vs

    def drop_before(self, chunk: int) -> None:
        """Free chunks no window can see any more."""
        for slot in self._store.values():
            for c in [c for c in slot if c < chunk]:
                del slot[c]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for slot in self._store.values() for k, _ in slot.values())
