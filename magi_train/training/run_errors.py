"""Faults that end a run with one line and a non-zero exit code, instead of a traceback or a hang.

The entry point (magi_train/train.py) prints `error: <message>` and exits with the fault's code, so a
scheduler can tell a configuration problem from a full disk from a diverged run. Exit codes:
  2  the configuration or the resumed checkpoint does not fit (also ConfigError)
  3  the run directory is in use by another run
  4  checkpoints cannot be written (not writable, no space left)
  5  training diverged (too many consecutive non-finite steps)
  6  the data has no usable sample (magi_train.data.skip_guard.DataUnusable)"""
from __future__ import annotations

import json
import os
import time

from magi_train.errors import RunStopped   # the faults' base class; its subclasses carry the codes above


def tell_launcher(line: str) -> None:
    """Under torchrun, write `line` to this worker's error file (TORCHELASTIC_ERROR_FILE), so that torchrun's
    failure summary shows it as the root cause instead of "To enable traceback see ...". torchrun still prints
    its own ChildFailedError traceback after it: it raises one for any worker that exits non-zero."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):   # torchrun creates none; an existing one belongs to someone else
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass


__all__ = ["RunStopped", "tell_launcher"]
