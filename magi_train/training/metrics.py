"""Where training numbers go: metrics.jsonl in the run directory (every step), a log line every N steps, a tqdm
progress bar, and wandb (offline unless the user asks for online; a wandb failure never stops the run)."""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from magi_train.errors import RunStopped

log = logging.getLogger("magi_train")


class MetricsWriteError(RunStopped):
    exit_code = 4


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def format_line(step: int, max_steps: int, m: dict) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}",
             f"{m['samples_per_s']:.2f} samples/s", f"{_fmt_count(m['tokens_per_s'])} tok/s",
             f"{m['step_time_s']:.3f} s/step", f"mem {m['peak_mem_gib']:.2f} GiB"]
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    bins = {k[len('loss/'):]: v for k, v in m.items() if k.startswith("loss/")}
    if bins:
        parts.append("by t: " + " ".join(f"{k} {v:.4f}" for k, v in bins.items()))
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, rank: int, start_step: int, config_dict: dict | None = None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.max_steps = cfg.train.max_steps
        self.log_every = cfg.train.log_every
        self.enabled = rank == 0
        self.path = self.run_dir / "metrics.jsonl"
        if self.enabled:   # a resumed run redoes the steps after its checkpoint: their old records go
            truncate_after(self.path, start_step)
        self._jsonl = open(self.path, "a", buffering=1) if self.enabled else None
        self.bar = None
        if self.enabled and cfg.train.progress_bar:
            self.bar = tqdm(total=self.max_steps, initial=start_step, desc=cfg.name, dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0)
        self.wandb = self._start_wandb(cfg, config_dict) if self.enabled else None

    def _start_wandb(self, cfg, config_dict):
        mode = os.environ.get("WANDB_MODE") or cfg.train.wandb.mode   # the environment wins, as wandb users expect
        if mode == "disabled":
            return None
        try:
            import wandb
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            run = wandb.init(project=cfg.train.wandb.project, entity=cfg.train.wandb.entity, name=cfg.name,
                             tags=list(cfg.train.wandb.tags), dir=str(self.run_dir), mode=mode, id=run_id,
                             resume="allow", config=config_dict, settings=wandb.Settings(silent=True, console="off"))
            if run_id is None:
                id_file.write_text(run.id)
            return run
        except Exception as e:   # wandb must never fail a training run
            self.write_line(f"wandb could not start ({type(e).__name__}: {e}); continuing without it")
            return None

    def write_line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Record `metrics` of `step` (the number of completed optimizer steps)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"step": step, "kind": kind, "time": time.time(), **clean}
        try:
            self._jsonl.write(json.dumps(record) + "\n")
        except OSError as e:
            raise MetricsWriteError(f"metrics: cannot write {self.path} ({e.strerror or e})") from None
        if self.wandb is not None:
            try:
                self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                               step=step)
            except Exception as e:
                self.write_line(f"wandb log failed ({type(e).__name__}: {e}); wandb is off for this run")
                self.wandb = None
        if kind == "train":
            if self.bar is not None:
                self.bar.update(step - self.bar.n)
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.1e}", refresh=False)
            if step % self.log_every == 0 or step == self.max_steps:
                self.write_line(format_line(step, self.max_steps, metrics))
        else:
            self.write_line(f"step {step} | {kind}: " + " | ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass


def truncate_after(path: Path, step: int) -> int:
    """Keep the records of steps <= `step` (and no torn last line) in metrics.jsonl, so that a run resumed from
    the checkpoint of `step` writes each later step once; returns how many records were dropped. The file is
    rewritten to a temporary and renamed: a kill in the middle leaves the old or the new file, never half."""
    if not path.is_file():
        return 0
    kept, dropped, unterminated = [], 0, False
    with open(path) as f:
        for line in f:
            unterminated = not line.endswith("\n")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped or unterminated:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def read_metrics(path: str | os.PathLike, kind: str = "train") -> dict[int, dict]:
    """metrics.jsonl -> {step: record} (a resumed run has dropped the records after its checkpoint, so each step
    appears once; the last record wins all the same); a torn last line (killed process) is ignored."""
    out = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == kind:
                out[rec["step"]] = rec
    return out


__all__ = ["MetricsLogger", "MetricsWriteError", "truncate_after", "read_metrics", "format_line", "peak_memory_gib"]
