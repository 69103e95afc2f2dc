"""Stop a diverged run instead of finishing it with garbage: after K consecutive steps whose loss or gradient
norm is not finite (each such update is skipped), the run ends with one line and a non-zero exit.

While a streak of non-finite steps is on, periodic checkpoints and exports wait (a due checkpoint is written
at the next finite step), so nothing newer than the last finite checkpoint is ever written or exported."""
from __future__ import annotations

from magi_train.errors import RunStopped


class Diverged(RunStopped):
    exit_code = 5


class DivergenceGuard:
    def __init__(self, max_nonfinite_steps: int):
        self.limit = max_nonfinite_steps   # 0 = never stop
        self.streak = 0
        self.first = 0
        self._save_pending = False

    @property
    def healthy(self) -> bool:
        return self.streak == 0

    def after_step(self, step: int, finite: bool, last_saved_step: int) -> None:
        """Record `step`; raises Diverged when it makes `limit` non-finite steps in a row."""
        if finite:
            self.streak = 0
            return
        if self.streak == 0:
            self.first = step
        self.streak += 1
        if self.limit and self.streak >= self.limit:
            last = f"step {last_saved_step}" if last_saved_step > 0 else "none"
            raise Diverged(f"train: diverged: {self.streak} consecutive steps with a non-finite loss or gradient "
                           f"norm (steps {self.first}-{step}); stopped without saving or exporting (last "
                           f"checkpoint: {last}); lower train.optimizer.lr or raise train.max_nonfinite_steps")

    def should_save(self, due: bool) -> bool:
        """Whether to write a checkpoint now: when due and healthy, or at the first finite step after a due one."""
        if not self.healthy:
            self._save_pending = self._save_pending or due
            return False
        if due or self._save_pending:
            self._save_pending = False
            return True
        return False


__all__ = ["DivergenceGuard", "Diverged"]
