"""Training checkpoints with torch.distributed.checkpoint (DCP): written to a temporary directory and renamed
when complete, so `checkpoints/` only ever shows whole checkpoints; the last K are kept.

Layout: {run}/checkpoints/step_00000100/ (DCP files + .metadata). A directory named step_* exists only after
its rename; `.tmp-*` and `.trash-*` directories are leftovers of a crash and are removed at the next start.
Deletion renames to `.trash-*` first for the same reason: a half-deleted checkpoint must not look complete.

The state is one nested dict (model, optimizer, EMA, scheduler, trainer counters) plus per-rank entries
(`rank_00003`: RNG states and data position, pickled) so each rank resumes its own stream. DCP reshards the
model/optimizer entries into any other tp/cp/pp/dp layout; rank entries need the same world size."""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from magi_train.staging import StagedDirectory, discard, remove_leftovers

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_key(rank: int) -> str:
    return f"rank_{rank:05d}"


def pack_rank_state(state: dict) -> bytes:
    # pickled into one opaque value: DCP would otherwise flatten lists/tuples of loader positions and RNG states
    return pickle.dumps(state)


def unpack_rank_state(blob: bytes) -> dict:
    return pickle.loads(blob)


class CheckpointManager:
    def __init__(self, directory: str | os.PathLike, keep_last: int = 3):
        self.directory = Path(directory)
        self.keep_last = keep_last

    # --- discovery ---
    def complete_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        steps = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / ".metadata").is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.directory / step_dir_name(steps[-1]) if steps else None

    def clean_leftovers(self) -> None:
        """Remove temporaries of an interrupted save or delete (rank 0)."""
        if _is_rank0():
            remove_leftovers(self.directory)
        _barrier()

    # --- save ---
    def save(self, step: int, state: dict, before_rename=None) -> Path:
        """Write `state` for `step`; returns the final directory. before_rename(tmp_dir) runs after the data is
        written and before it becomes visible (a fault-injection point for tests)."""
        staged = StagedDirectory(self.directory / step_dir_name(step))
        if _is_rank0():
            staged.create()
        _barrier()
        dcp.save(state, checkpoint_id=str(staged.path))
        _barrier()
        if _is_rank0():
            if before_rename is not None:
                before_rename(staged.path)
            staged.commit()   # re-saving a step (end of run right after a periodic save) replaces it whole
            self._prune()
        _barrier()
        return staged.target

    def _prune(self) -> None:
        for step in self.complete_steps()[:-self.keep_last]:
            discard(self.directory / step_dir_name(step))

    # --- load ---
    @staticmethod
    def load(path: str | os.PathLike, state: dict, allow_partial: bool = False) -> dict:
        """Fill `state` (same structure as saved) in place from the checkpoint at `path`; returns it."""
        dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=allow_partial))
        return state


__all__ = ["CheckpointManager", "step_dir_name", "rng_state", "set_rng_state", "rank_key", "pack_rank_state",
           "unpack_rank_state"]
