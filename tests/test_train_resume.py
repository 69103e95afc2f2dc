"""Crash safety of training, with real processes: kill -9 mid-step and mid-checkpoint-write, then resume and
compare with an uninterrupted run (exact in fp32 on CPU); SIGTERM/SIGUSR1 leave a checkpoint and exit 0."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from magi_train.training import CheckpointManager, read_metrics
from magi_train.checkpoint.manager import unpack_rank_state
from magi_train.training.loop import FAULT_STALL_SAVE, FAULT_STALL_STEP

REPO = Path(__file__).resolve().parents[1]
# 6 steps of the tiny model; 2 microbatches a step, clean prefixes and caption dropout on: every source of
# randomness and the data position must come back exactly after a resume.
BASE = ["experiment=smoke", "train.max_steps=6", "train.checkpoint.every_steps=3", "train.checkpoint.keep_last=3",
        "train.validation.every_steps=0", "train.checkpoint.export_at_end=false", "train.precision=fp32",
        "train.device=cpu", "train.progress_bar=false", "train.wandb.mode=disabled", "train.log_every=1",
        "train.grad_accum_steps=2", "data.num_samples=6", "data.latent_frames=12", "train.flow.clean_prefix_prob=0.5",
        "train.flow.caption_dropout=0.3"]


def launch(out: Path, name: str, extra=(), fault: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_STALL_STEP, FAULT_STALL_SAVE)}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(fault or {})})
    cmd = [sys.executable, "-m", "magi_train.train", *BASE, f"output_dir={out}", f"name={name}", *extra]
    log = open(out / f"{name}.log", "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before {marker.name}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {marker.name}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"process did not finish:\n{log.read_text()[-3000:]}")


def no_torn_checkpoint(ckpt_dir: Path) -> list[int]:
    """Every visible step_* directory is complete; returns the complete steps."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith("step_"):
            assert (p / ".metadata").is_file(), f"torn checkpoint visible: {p}"
    return CheckpointManager(ckpt_dir).complete_steps()


def flat_checkpoint(path: Path, out: Path) -> dict:
    """{'model.x.weight': tensor, 'trainer.step': 6, ...}: every leaf of a DCP checkpoint."""
    dcp_to_torch_save(str(path), str(out))
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = obj

    walk("", torch.load(out, weights_only=False))
    return flat


def test_kill9_mid_step_and_mid_save_then_resume_is_exact(tmp_path):
    ref = launch(tmp_path, "ref")
    victim = launch(tmp_path, "victim", fault={FAULT_STALL_STEP: "5"})
    run, log = tmp_path / "victim", tmp_path / "victim.log"

    # 1. kill -9 in the middle of step 5 (after its backward, before its update): step 3 is the last checkpoint
    wait_for(run / "stalled_at_step_5", victim, log)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert no_torn_checkpoint(run / "checkpoints") == [3]

    # 2. resume, and kill -9 while the step-6 checkpoint is being written (data on disk, not yet renamed)
    victim = launch(tmp_path, "victim", fault={FAULT_STALL_SAVE: "6"})
    wait_for(run / "stalled_in_save_6", victim, log)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (run / "checkpoints" / ".tmp-step_00000006").is_dir(), "the kill did not land inside the write"
    assert no_torn_checkpoint(run / "checkpoints") == [3]

    # 3. resume again and finish
    victim = launch(tmp_path, "victim")
    assert finish(victim, log) == 0, log.read_text()[-3000:]
    assert no_torn_checkpoint(run / "checkpoints") == [3, 6]
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    assert finish(ref, tmp_path / "ref.log") == 0, (tmp_path / "ref.log").read_text()[-3000:]

    a = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    b = read_metrics(run / "metrics.jsonl")       # the last record of each step: the resumed run's
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert (a[step]["loss"], a[step]["grad_norm"], a[step]["lr"]) == \
               (b[step]["loss"], b[step]["grad_norm"], b[step]["lr"]), f"step {step} differs after resume"
    # and the final states are bit-identical: weights, optimizer moments, EMA, data position
    fa = flat_checkpoint(tmp_path / "ref" / "checkpoints" / "step_00000006", tmp_path / "a.pt")
    fb = flat_checkpoint(run / "checkpoints" / "step_00000006", tmp_path / "b.pt")
    assert fa.keys() == fb.keys()
    tensors = [k for k in fa if isinstance(fa[k], torch.Tensor)]
    for part in ("model.", "optimizer.", "ema.shadow."):
        assert any(k.startswith(part) for k in tensors), part
    for k in tensors:
        assert torch.equal(fa[k], fb[k]), k
    assert fa["trainer.step"] == fb["trainer.step"] == 6 and fa["ema.updates"] == fb["ema.updates"] == 6
    assert fa["scheduler"] == fb["scheduler"]
    rng_a, rng_b = (unpack_rank_state(f["rank_00000"])["rng"] for f in (fa, fb))
    assert torch.equal(rng_a["torch"], rng_b["torch"])
    data_a, data_b = (unpack_rank_state(f["data_00000"])["data"] for f in (fa, fb))
    assert data_a == data_b and data_a["batch_in_epoch"] > 0


def test_stop_signals_save_complete_checkpoint_and_exit_0(tmp_path):
    procs = {}
    for signum in (signal.SIGTERM, signal.SIGUSR1):     # both at once: they are independent runs
        name = signal.Signals(signum).name
        procs[signum] = (name, launch(tmp_path, name, extra=["train.max_steps=1000", "train.checkpoint.every_steps=0"],
                                      fault={FAULT_STALL_STEP: "3"}))
    for signum, (name, proc) in procs.items():
        wait_for(tmp_path / name / "stalled_at_step_3", proc, tmp_path / f"{name}.log")
        proc.send_signal(signum)
    for signum, (name, proc) in procs.items():
        run, log = tmp_path / name, tmp_path / f"{name}.log"
        assert finish(proc, log) == 0, log.read_text()[-3000:]
        assert no_torn_checkpoint(run / "checkpoints") == [3]
        assert sorted(read_metrics(run / "metrics.jsonl")) == [1, 2, 3]
        assert f"stop signal {int(signum)}" in log.read_text()
