"""Small host tensors (per-chunk t, step sizes, guidance scales) onto the GPU without waiting for it.

A plain `.to("cuda")` from ordinary (pageable) host memory makes torch copy and then synchronise the stream, so
every forward that uploads its t waits for the previous forward to finish: the host cannot queue the next
forward's kernels while the GPU runs this one, and any host work in between (the next step's bookkeeping, the
streamed mp4) leaves the GPU idle. A copy from pinned memory is queued on the stream like a kernel instead
(torch's pinned-memory cache keeps the staging block alive until the copy has run)."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """x (on the host) on `device`, queued behind the work already on the stream; no host-side wait on CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
