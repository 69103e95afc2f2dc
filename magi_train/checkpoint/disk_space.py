"""Checkpoints that cannot be written end the run with one line, not a traceback from deep inside DCP.

At start-up the checkpoint directory must take a file (a read-only directory is otherwise found one interval
later, at the first save). Before each save the free space must hold about one more checkpoint: the size of
the last complete one or the bytes of the state's tensors, whichever is larger. A write that still fails (ENOSPC
surfaces from DCP's writer as e.g. "unexpected pos 704 vs 598") is reported as the full disk it is, the
half-written temporary is removed, and the complete checkpoints stay as they were."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from magi_train.errors import RunStopped
from magi_train.parallel.env import any_rank

MARGIN = 1.05          # DCP metadata and pickled entries beside the tensors
SLACK = 1 << 20


class CheckpointWriteError(RunStopped):
    exit_code = 4


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def check_writable(directory: str | os.PathLike) -> None:
    """Create `directory` and write, sync and remove a file in it; CheckpointWriteError with one line if not."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"magi")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        raise CheckpointWriteError(f"checkpoints: cannot write to {directory} ({e.strerror or e}); make it "
                                   f"writable or set output_dir= to a writable place") from None


def directory_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def state_bytes(state: dict) -> int:
    """Bytes of this rank's tensors in a (nested) checkpoint state."""
    flat, _ = flatten_state_dict(state)
    total = 0
    for v in flat.values():
        if torch.is_tensor(v):
            local = getattr(v, "_local_tensor", v)
            total += local.numel() * local.element_size()
    return total


def _is_enospc(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "unexpected pos" in text or "ENOSPC" in text:
            return True
        failures = getattr(e, "failures", None)   # DCP's CheckpointException: {rank: exception}
        if isinstance(failures, dict) and any(_is_enospc(f) for f in failures.values() if isinstance(f, BaseException)):
            return True
        e = e.__cause__ or e.__context__
    return False


def guarded_save(save: Callable[[], Path], directory: Path, step: int, state: dict, last: Path | None,
                 cleanup: Callable[[], None]) -> Path:
    """Run save() (which writes the checkpoint of `step` into `directory`) after a free-space check; a failure
    to write becomes CheckpointWriteError naming the directory and the space needed. last: the newest complete
    checkpoint (its size is the estimate), cleanup: removes a half-written temporary."""
    need = int(max(directory_bytes(last) if last is not None else 0, state_bytes(state)) * MARGIN) + SLACK
    free = shutil.disk_usage(directory).free
    if any_rank(free < need):
        raise CheckpointWriteError(f"checkpoint of step {step}: {directory} has {_mb(free)} free, a checkpoint "
                                   f"needs about {_mb(need)}; free some space and resume (the checkpoints "
                                   f"written so far are complete)")
    try:
        return save()
    except BaseException as e:   # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        full = _is_enospc(e)
        if not full and not isinstance(e, OSError):
            raise
        cleanup()
        free = shutil.disk_usage(directory).free
        what = "no space left on device" if full else (getattr(e, "strerror", None) or str(e).splitlines()[0])
        raise CheckpointWriteError(f"checkpoint of step {step}: writing to {directory} failed: {what} (a "
                                   f"checkpoint needs about {_mb(need)}, {_mb(free)} free); the checkpoints "
                                   f"written before are complete") from None


__all__ = ["CheckpointWriteError", "check_writable", "guarded_save", "state_bytes", "directory_bytes"]
