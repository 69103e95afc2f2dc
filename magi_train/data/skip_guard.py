"""Stop a loader that can only skip: when every sample fails (every mp4 corrupt, every caption missing, latents
that differ from their metadata) the reader would skip batch after batch forever and never yield one.

The guard runs in the training process over what the reader workers report: after `max_consecutive` skipped
samples in a row (data.max_consecutive_skips), or at the end of an epoch read from its start without one
usable sample, it raises DataUnusable with one line naming the reasons, their counts and the last sample."""
from __future__ import annotations

from collections import Counter


class DataUnusable(RuntimeError):
    """One line; the training entry point exits with this code (see magi_train/training/run_errors.py)."""

    exit_code = 6


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


class SkipGuard:
    def __init__(self, max_consecutive: int, start: tuple[int, int]):
        self.max_consecutive = max_consecutive
        self.epoch = start[0]
        self.whole_epoch = start[1] == 0   # only an epoch seen from its first batch can prove it held nothing
        self.run, self.run_reasons = 0, Counter()
        self.epoch_good, self.epoch_reasons = 0, Counter()
        self.last = ""

    def batch(self, epoch: int, b: int, good: int, skipped: list[tuple[str, str, str]]) -> None:
        """Record one batch of the plan (its position, usable samples, skipped (key, reason, message))."""
        if epoch != self.epoch:
            self._end_epoch()
            self.epoch, self.whole_epoch = epoch, b == 0
            self.epoch_good, self.epoch_reasons = 0, Counter()
        for _, reason, message in skipped:
            self.run_reasons[reason] += 1
            self.epoch_reasons[reason] += 1
            self.last = message
        if good:
            self.run, self.run_reasons = 0, Counter()
            self.epoch_good += good
            return
        self.run += len(skipped)
        if self.max_consecutive and self.run >= self.max_consecutive:
            raise DataUnusable(f"data: {self.run} samples in a row could not be used ({_reasons(self.run_reasons)}); "
                               f"last: {self.last}; check data.shards (or raise data.max_consecutive_skips)")

    def end(self) -> None:
        """The stream ended (a single-pass loader): its last epoch is complete."""
        self._end_epoch()

    def _end_epoch(self) -> None:
        if self.whole_epoch and not self.epoch_good and self.epoch_reasons:
            n = sum(self.epoch_reasons.values())
            raise DataUnusable(f"data: epoch {self.epoch} held no usable sample: {n} skipped "
                               f"({_reasons(self.epoch_reasons)}); last: {self.last}; check data.shards")


__all__ = ["SkipGuard", "DataUnusable"]
