"""SIGTERM / SIGUSR1 (what Slurm and torchrun send before preemption) ask the loop to save and exit 0.

The handler only sets a flag; the loop finishes its current step, writes a checkpoint and returns, so no
checkpoint is ever written from inside a signal handler. With several ranks the flag is agreed on with an
all-reduce (MAX) so that every rank stops at the same step. The entry point installs the flag before any
start-up work (imports, model build, resume), so a signal during start-up also ends in a clean exit 0 with a
line saying so, instead of death by signal; torch is imported only when the flag is first agreed on."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self, signals=STOP_SIGNALS, received: int | None = None):
        self.signum: int | None = received   # a signal caught before this flag existed (train.py)
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, device) -> bool:
        """True when any rank received a stop signal (collective when distributed)."""
        from magi_train.parallel.env import any_rank   # late: this module is imported before torch on purpose

        return any_rank(self.requested, device)

    def stop_line(self, step: int, saved: bool) -> str:
        """The line the loop prints when it stops on the signal."""
        if saved:
            return f"stop signal {self.signum}: checkpoint of step {step} written, exiting"
        if step == 0:
            return f"stop signal {self.signum} during start-up: no step taken, nothing to save, exiting"
        return f"stop signal {self.signum}: the checkpoint of step {step} is the latest, nothing new to save, exiting"

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}


__all__ = ["PreemptionFlag", "STOP_SIGNALS"]
