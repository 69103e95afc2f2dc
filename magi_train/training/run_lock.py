"""One run per run directory: an advisory lock file, {run}/.lock, holding the host and pid of the run using it.

Two runs on one directory destroy each other (the second's start-up removes the first's half-written
checkpoint, the first prunes the checkpoint the second is loading), so the second stops with one line.
The lock is an flock on the file: the kernel drops it when its process dies, even under kill -9, so a lock
file left by a dead process is taken over (with a line naming it). Within one process the lock is shared
(tests build several Trainers on one directory in turn). Only global rank 0 takes it."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from magi_train.errors import RunStopped

log = logging.getLogger("magi_train")
LOCK_NAME = ".lock"


class RunDirBusy(RunStopped):
    exit_code = 3


_held: dict[str, list] = {}   # resolved lock path -> [fd, holders] of this process


def _identity() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 256).decode("utf-8", "replace").strip()


def _who(holder: str) -> str:
    host, _, pid = holder.partition(" ")
    return f"pid {pid} on {host}" if pid else "holder unknown"


def _alive_here(holder: str) -> bool:
    """Without flock support: is the recorded holder a live process of this host?"""
    host, _, pid = holder.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Holds the lock of `run_dir` until release() (or until this object is collected)."""

    def __init__(self, run_dir: str | os.PathLike):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self._key = str(self.path.resolve())
        self._released = False
        if self._key in _held:
            _held[self._key][1] += 1
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _read(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(f"run directory {run_dir} is in use by another run ({_who(previous)}; lock "
                                     f"{self.path}); wait for it to end or choose another name=") from None
                if _alive_here(previous):   # a filesystem without flock: trust a live pid of this host
                    raise RunDirBusy(f"run directory {run_dir} is in use by another run ({_who(previous)}; lock "
                                     f"{self.path}); wait for it to end or choose another name=") from None
            if previous and previous != _identity():
                log.warning("run lock: %s was left by %s, which is gone; taking it over", self.path, _who(previous))
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (_identity() + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        _held[self._key] = [fd, 1]

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        entry = _held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self._key]
            try:   # an empty file says "free"; the file stays (unlinking it would race with a waiting run)
                os.ftruncate(entry[0], 0)
            except OSError:
                pass
            os.close(entry[0])   # drops the flock

    def __del__(self) -> None:
        self.release()


__all__ = ["RunLock", "RunDirBusy", "LOCK_NAME"]
