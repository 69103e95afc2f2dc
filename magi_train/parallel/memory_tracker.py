"""Live tensor bytes and their peak, counted at the dispatcher (CPU, or fake tensors for estimates).

Every tensor an aten op returns is counted once per storage until the storage is freed; tensors that exist
before tracking starts are added with `add_existing`. On CUDA prefer torch.cuda.max_memory_allocated (the
backward runs on another thread, outside a dispatch mode)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def _track(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)  # storage objects are preserved while the storage lives; views share one
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def add_existing(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
