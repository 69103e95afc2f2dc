"""Write a directory completely or not at all; the one helper every writer of checkpoints, exports and encoder
weights uses.

The directory is built under a staging name beside the target (`.tmp-NAME`) and renamed onto NAME only when every
file is written and synced, so a reader (or a resumed run) never sees a half-written NAME. An existing NAME is
first renamed to `.trash-NAME` (still on disk, still whole) and removed after the swap. Leftovers of a crash are
`.tmp-*` and `.trash-*` entries, which `remove_leftovers` clears.

Several ranks writing one directory (DCP, a pipeline-parallel export) use the split form: rank 0 `create()`s,
every rank writes into `.path`, rank 0 `commit()`s after a barrier."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def discard(path: Path) -> None:
    """Remove a directory so that no half-deleted copy is ever visible under its name."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(directory: Path) -> None:
    """Delete the staging and trash entries an interrupted write or delete left in `directory`."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(p, ignore_errors=True)


class StagedDirectory:
    def __init__(self, target: str | os.PathLike):
        self.target = Path(target).absolute()
        self.path = self.target.with_name(f"{STAGING_PREFIX}{self.target.name}")

    def create(self) -> Path:
        """An empty staging directory (a leftover of an earlier try is removed first)."""
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self.path

    def commit(self) -> Path:
        """Swap the finished staging directory in as the target; returns the target."""
        for f in self.path.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if self.target.exists():
            trash = self.target.with_name(f"{TRASH_PREFIX}{self.target.name}")
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(self.target, trash)
            os.rename(self.path, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.path, self.target)
        fsync_dir(self.target.parent)
        return self.target

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staged_directory(target: str | os.PathLike):
    """One writer: yields the staging directory's path; on success it becomes `target`, on error it is removed."""
    staged = StagedDirectory(target)
    path = staged.create()
    try:
        yield path
    except BaseException:
        staged.abandon()
        raise
    staged.commit()


__all__ = ["StagedDirectory", "staged_directory", "discard", "remove_leftovers", "fsync_dir", "STAGING_PREFIX",
           "TRASH_PREFIX"]
