"""Faults a demanding user meets, through the training entry point: each ends in one line and an exit code that
says what happened, and loses or destroys nothing (issue 16). Most runs call magi_train.train.main in this
process (no interpreter start per run); the ones that need a second process, a signal or a small filesystem
start real ones."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magi_train.train import main
from magi_train.training import CheckpointManager
from magi_train.training.loop import FAULT_STALL_STEP

REPO = Path(__file__).resolve().parents[1]
ARGS = ["experiment=smoke", "train.max_steps=4", "train.checkpoint.every_steps=2", "train.checkpoint.keep_last=3",
        "train.validation.every_steps=0", "train.checkpoint.export_at_end=false", "train.device=cpu",
        "train.progress_bar=false", "train.wandb.mode=disabled", "train.log_every=1", "data.num_samples=4"]


def run(tmp_path, capsys, *extra, name="r") -> tuple[int, str]:
    """main() of `python -m magi_train.train`: (exit code, what it printed to stderr)."""
    capsys.readouterr()
    # main's logging.basicConfig does nothing when the root logger has handlers (pytest's, an earlier call's):
    # without them it sends this call's log lines to this test's captured stderr, as a user's terminal shows them
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []
    try:
        code = main([*ARGS, f"output_dir={tmp_path}", f"name={name}", *extra])
    finally:
        root.handlers, root.level = handlers, level
    return code, capsys.readouterr().err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def snapshot(run_dir: Path) -> dict:
    """Every file of a run directory (but the lock) with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def steps_once(metrics: Path) -> list[int]:
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines() if '"kind": "train"' in ln]
    assert len(steps) == len(set(steps)), f"steps repeated in metrics.jsonl: {steps}"
    return steps


def test_resume_into_another_model_shape_stops_before_anything_is_written(tmp_path, capsys):
    assert run(tmp_path, capsys)[0] == 0
    before = snapshot(tmp_path / "r")
    # smaller (today: "resumed", exit 0, the 2-layer checkpoints pruned, config.yaml overwritten)
    code, err = run(tmp_path, capsys, "train.max_steps=8", "model.num_layers=1")
    assert code == 2 and "model.videodit_blocks.layers.1." in error_line(err) and "this model does not" in err
    assert "model.num_layers: 2 in the run's config.yaml, 1 now" in err
    assert "train.resume_partial=true" in err
    assert snapshot(tmp_path / "r") == before, "a refused resume changed the run directory"
    # bigger (today: a traceback after config.yaml is already overwritten)
    code, err = run(tmp_path, capsys, "train.max_steps=8", "model.num_layers=3")
    assert code == 2 and "model.videodit_blocks.layers.2." in error_line(err) and "the checkpoint does not" in err
    assert snapshot(tmp_path / "r") == before
    # asked for: load what fits, and say what was left out
    code, err = run(tmp_path, capsys, "train.max_steps=5", "model.num_layers=1", "train.resume_partial=true")
    assert code == 0, err[-3000:]
    assert "train.resume_partial" in err and "left unused" in err and "layers.1." in err
    assert "from step 4" in err


def test_damaged_latest_checkpoint_falls_back_names_the_file_and_keeps_it(tmp_path, capsys):
    ckpts = tmp_path / "r" / "checkpoints"
    assert run(tmp_path, capsys)[0] == 0
    # a truncated data file (today: a 40-line traceback ending in EOFError that names no file)
    data = ckpts / "step_00000004" / "__0_0.distcp"
    half = data.stat().st_size // 2
    os.truncate(data, half)
    code, err = run(tmp_path, capsys, "train.max_steps=5")
    assert code == 0, err[-3000:]
    assert f"{data} is truncated" in err and "from step 2" in err
    assert (ckpts / "damaged-step_00000004" / "__0_0.distcp").stat().st_size == half, "the damaged one is kept"
    # a truncated .metadata (today: UnpicklingError): falls back to step 4, rewritten by the run above
    meta = ckpts / "step_00000005" / ".metadata"
    os.truncate(meta, 100)
    code, err = run(tmp_path, capsys, "train.max_steps=6")
    assert code == 0, err[-3000:]
    assert f"{meta} is unreadable" in err and "from step 4" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["damaged-step_00000004", "damaged-step_00000005",
                                                         "step_00000002", "step_00000004", "step_00000006"]
    assert steps_once(tmp_path / "r" / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    # nothing left that loads: one line, the damaged checkpoints kept
    for step in (2, 4, 6):
        os.truncate(ckpts / f"step_{step:08d}" / ".metadata", 10)
    code, err = run(tmp_path, capsys, "train.max_steps=7")
    assert code == 2 and "no checkpoint" in error_line(err)
    assert len([p for p in ckpts.iterdir() if p.name.startswith("damaged-")]) == 5


def test_explicit_resume_path_that_is_damaged_is_one_line(tmp_path, capsys):
    assert run(tmp_path, capsys, "train.max_steps=2")[0] == 0
    path = tmp_path / "r" / "checkpoints" / "step_00000002"
    os.truncate(path / "__0_0.distcp", 100)
    code, err = run(tmp_path, capsys, f"resume={path}", name="other")
    assert code == 2 and f"{path / '__0_0.distcp'} is truncated" in error_line(err)
    assert path.is_dir(), "an explicitly named checkpoint is never moved"


def launch(tmp_path: Path, name: str, *extra, env: dict | None = None) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if not k.startswith("MAGI_FAULT")}
    e.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **(env or {})})
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "magi_train.train", *ARGS, f"output_dir={tmp_path}",
                             f"name={name}", *extra], cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited with {proc.returncode} before {path.name}"
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {path}")
        time.sleep(0.01)


def test_second_run_on_a_run_directory_stops_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
    first = launch(tmp_path, "r", env={FAULT_STALL_STEP: "3"})
    wait_for(tmp_path / "r" / "stalled_at_step_3", first)   # step 2's checkpoint written, step 3 in flight
    before = snapshot(tmp_path / "r" / "checkpoints")
    code, err = run(tmp_path, capsys)
    assert code == 3 and f"pid {first.pid}" in error_line(err) and "in use" in err
    assert snapshot(tmp_path / "r" / "checkpoints") == before
    first.send_signal(signal.SIGKILL)
    first.wait()
    # the kernel dropped the dead run's lock; the file still names it
    code, err = run(tmp_path, capsys)
    assert code == 0, err[-3000:]
    assert f"left by pid {first.pid}" in err and "taking it over" in err
    assert steps_once(tmp_path / "r" / "metrics.jsonl") == [1, 2, 3, 4]
    assert (tmp_path / "r" / ".lock").read_text() == "", "a finished run leaves its lock free"


def test_diverging_run_stops_nonzero_and_exports_nothing(tmp_path, capsys):
    # today: 29 of 30 steps skipped, exit 0 and an export of weights of magnitude 4.5e9
    code, err = run(tmp_path, capsys, "train.optimizer.lr=1e10", "train.max_steps=30", "train.checkpoint.every_steps=5",
                    "train.checkpoint.export_at_end=true")
    line = error_line(err)   # the default train.max_nonfinite_steps=10
    assert code == 5 and "diverged: 10 consecutive steps" in line and "(steps 2-11)" in line
    assert "last checkpoint: none" in line
    assert not (tmp_path / "r" / "export").exists()
    assert CheckpointManager(tmp_path / "r" / "checkpoints").complete_steps() == []
    assert "non-finite gradient norm, update skipped (samples: train-" in err   # the samples are named


def test_stop_signal_during_start_up_exits_0_with_a_line(tmp_path):
    proc = launch(tmp_path, "r", "train.max_steps=1000")
    wait_for(tmp_path / "r" / ".lock", proc)   # the trainer has started building: model, data, resume
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0   # today: killed by the signal (-15), no message
    log = (tmp_path / "r.log").read_text()
    assert "stop signal 15 during start-up: no step taken, nothing to save, exiting" in log, log[-3000:]
    assert "Traceback" not in log


def _unshare_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return r.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_mount_works(), reason="needs unshare -rm and tmpfs mounts")


def in_small_filesystem(fs: Path, size: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m magi_train.train ARGS output_dir=fs args` in a mount namespace where fs is a tmpfs of
    `size`; `script` is shell run after the mount (e.g. a read-only mount)."""
    fs.mkdir()
    cmd = " ".join([sys.executable, "-m", "magi_train.train", *ARGS, f"output_dir={fs}", "name=r", *args])
    sh = f"mount -t tmpfs -o size={size} tmpfs {fs} && {script} {cmd}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(["unshare", "-rm", "sh", "-c", sh], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@needs_mounts
def test_disk_full_and_read_only_checkpoints_are_one_line(tmp_path):
    # 0.5M parameters: a checkpoint (weights, two AdamW moments, EMA) takes 8.3 MB; 12 MB hold one, not two
    r = in_small_filesystem(tmp_path / "full", "12m", "", "train.checkpoint.every_steps=1")
    line = error_line(r.stderr)
    assert r.returncode == 4 and "checkpoint of step 2" in line and "free, a checkpoint needs about" in line
    # a read-only checkpoints/ is found at start-up, not at the first save one interval later
    fs = tmp_path / "ro"
    r = in_small_filesystem(fs, "12m", f"mkdir -p {fs}/r/checkpoints && mount -t tmpfs -o ro tmpfs {fs}/r/checkpoints &&")
    line = error_line(r.stderr)
    assert r.returncode == 4 and "cannot write to" in line and "Read-only" in line and "step 1" not in r.stderr


@needs_mounts
def test_a_write_that_runs_out_of_space_is_one_line_naming_the_need(tmp_path):
    """The free-space estimate can be wrong (another writer): the write's own ENOSPC, which DCP surfaces as
    'unexpected pos', becomes the line, and the half-written temporary is removed."""
    fs = tmp_path / "fs"
    fs.mkdir()
    code = f"""
import torch
from pathlib import Path
from magi_train.checkpoint.manager import CheckpointManager
from magi_train.checkpoint.disk_space import CheckpointWriteError, guarded_save
d = Path({str(fs)!r}) / "checkpoints"
d.mkdir()
mgr = CheckpointManager(d)
try:
    guarded_save(lambda: mgr.save(1, {{"model": {{"w": torch.ones(1_000_000)}}}}), d, 1, {{"w": torch.ones(1)}}, None,
                 mgr.clean_leftovers)
except CheckpointWriteError as e:
    print("LINE", e)
print("LEFT", sorted(p.name for p in d.iterdir()))
"""
    script = tmp_path / "write.py"
    script.write_text(code)
    sh = f"mount -t tmpfs -o size=2m tmpfs {fs} && {sys.executable} {script}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", sh], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert f"LINE checkpoint of step 1: writing to {fs / 'checkpoints'} failed: no space left on device" in r.stdout, \
        r.stdout + r.stderr
    assert "LEFT []" in r.stdout


def test_new_options_are_checked(tmp_path, capsys):
    code, err = run(tmp_path, capsys, "train.max_nonfinite_steps=-1")
    assert code == 2 and "train.max_nonfinite_steps" in err
    code, err = run(tmp_path, capsys, "train.resume_partial=maybe")
    assert code == 2 and "train.resume_partial" in err


def test_torchrun_with_a_layout_that_does_not_fit_names_our_line_as_the_root_cause(tmp_path):
    """torchrun raises (and prints) its own ChildFailedError for any worker that exits non-zero, whatever the
    worker does; what the worker can do is put its one line into torchrun's summary, instead of "To enable
    traceback see ..." (today)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "magi_train.train", *ARGS, "parallel.tp=3",
                        f"output_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    line = "config error: parallel.dp: tp*cp*pp*dp = 3*1*1*1 = 3 must equal the world size 2"
    assert r.returncode != 0 and r.stderr.startswith(line), r.stderr[-3000:]
    root_cause = r.stderr[r.stderr.index("Root Cause"):]
    assert f"traceback : {line}" in root_cause, root_cause


def test_the_layout_independent_format_is_checked_the_same_way(tmp_path, capsys):
    """A dp2 (torchrun) checkpoint, the format every layout writes: resuming it into another model shape in one
    process is the same one line, resume_partial loads what fits, and a damaged one is skipped."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to this python")
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "magi_train.train", *ARGS, "train.max_steps=4",
                        "parallel.dp=2", "parallel.dp_mode=ddp", "data.batch_size=1", f"output_dir={tmp_path}",
                        "name=r"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(tmp_path / "r")
    code, err = run(tmp_path, capsys, "train.max_steps=6", "model.num_layers=1", "data.batch_size=2")
    assert code == 2 and "model.videodit_blocks.layers.1." in error_line(err)
    assert snapshot(tmp_path / "r") == before
    shutil.copytree(tmp_path / "r", tmp_path / "r2")
    code, err = run(tmp_path, capsys, "train.max_steps=5", "model.num_layers=1", "data.batch_size=2",
                    "train.resume_partial=true", name="r2")
    assert code == 0 and "from step 4" in err and "left unused" in err, err[-3000:]
    data = tmp_path / "r" / "checkpoints" / "step_00000004" / "__1_0.distcp"
    os.truncate(data, 10)
    code, err = run(tmp_path, capsys, "train.max_steps=5", "data.batch_size=2")
    assert code == 0 and f"{data} is truncated" in err and "from step 2" in err, err[-3000:]
