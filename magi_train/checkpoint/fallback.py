"""resume=auto from the newest checkpoint that loads: a damaged one is named, set aside, and the previous used.

A checkpoint directory is complete once renamed (checkpoint.py), but its files can still be damaged later
(a disk error, a copy cut short, a user's truncate). Each candidate is first checked from its .metadata alone:
every file it lists must exist and be long enough for the bytes it records. One that fails, or whose load
fails, is renamed to `damaged-step_XXXXXXXX` (never deleted: the user may want it; pruning and `latest()`
no longer see it) with one line naming the file and why, and the next older one is tried. A checkpoint
that is intact but does not fit the model (fit_check.ResumeMismatch) stops the run instead: an older
checkpoint of the same run would not fit either."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from magi_train.errors import RunStopped
from magi_train.parallel.env import any_rank

log = logging.getLogger("magi_train")
DAMAGED_PREFIX = "damaged-"


class NoLoadableCheckpoint(RunStopped):
    exit_code = 2


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def damage(path: str | os.PathLike) -> str | None:
    """Why the checkpoint at `path` cannot load, naming the file; None when its files look whole."""
    path = Path(path)
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:   # a truncated or garbled pickle raises EOFError, UnpicklingError, ...
        return f"{path / '.metadata'} is unreadable ({_first_line(e)})"
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        have = f.stat().st_size
        if have < size:
            return f"{f} is truncated ({have} of at least {size} bytes)"
    return None


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint so that nothing treats it as complete or deletes it; returns the new path."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{DAMAGED_PREFIX}{path.name}-{n}")
    os.rename(path, target)
    return target


def load_newest_loadable(candidates: list[Path], load: Callable[[Path], None], fallback: bool) -> Path:
    """Call load(path) on the newest candidate that is intact and loads; returns it. fallback=False (an explicit
    resume=PATH): the first candidate's damage is the one-line error."""
    skipped = []
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for path in candidates:
        why = damage(path)
        if why is None:
            try:
                load(path)
                ok, error = True, None
            except (RunStopped, ValueError):   # the run's config against an intact checkpoint: not damage
                raise
            except (Exception, CheckpointException) as e:   # the reader failed: this checkpoint is damaged
                ok, error = False, e
            if not any_rank(not ok):   # every rank's load succeeded
                if skipped:
                    log.warning("resume: using %s instead", path.name)
                return path
            why = f"loading it failed ({_first_line(error) if error is not None else 'on another rank'})"
        if not fallback:
            raise NoLoadableCheckpoint(f"resume: {path} cannot be loaded: {why}")
        if dist.is_initialized():
            dist.barrier()
        kept = set_aside(path) if rank0 else path
        if dist.is_initialized():
            dist.barrier()
        log.warning("resume: skipping checkpoint %s: %s; kept as %s", path.name, why, kept.name)
        skipped.append(f"{path.name}: {why}")
    raise NoLoadableCheckpoint(f"resume=auto: no checkpoint in {candidates[0].parent} loads ({'; '.join(skipped)}); "
                               f"the damaged ones are kept as {DAMAGED_PREFIX}step_*; pass resume=none with another "
                               f"name= to start over")


__all__ = ["load_newest_loadable", "damage", "set_aside", "NoLoadableCheckpoint", "DAMAGED_PREFIX"]
