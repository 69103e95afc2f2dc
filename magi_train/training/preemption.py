"""SIGTERM / SIGUSR1 (what Slurm and torchrun send before preemption) ask the loop to save and exit 0.

The handler only sets a flag; the loop finishes its current step, writes a checkpoint and returns, so no
checkpoint is ever written from inside a signal handler. With several ranks the flag is agreed on with an
all-reduce (MAX) so that every rank stops at the same step."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, device: torch.device) -> bool:
        """True when any rank received a stop signal (collective when distributed)."""
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


__all__ = ["PreemptionFlag", "STOP_SIGNALS"]
