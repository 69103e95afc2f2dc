"""Shared by the tests that run the training entry point as subprocesses (one process, or torchrun with gloo) and
compare a layout's run with one process's: launching, the metric comparison, the export bound, preemption."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from magi_train.training import read_metrics

REPO = Path(__file__).resolve().parents[1]
# the key layernorms' biases have analytically zero gradients (a bias added to every key shifts a query's logits
# by a constant): Adam turns their round-off into steps, so weight comparisons leave them out
ZERO_GRADIENT_SUFFIXES = ("k_layernorm.bias", "k_layernorm_xattn.bias")


def job_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}


def train_command(nproc: int, args: list[str]) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, "-m", "magi_train.train", *args]


def run_entry(out: Path, name: str, nproc: int, common: list[str], extra: list[str], timeout: int = 300) -> None:
    """`python -m magi_train.train` (torchrun when nproc > 1) into out/name; its output kept in out/name.log."""
    cmd = train_command(nproc, [*common, f"output_dir={out}", f"name={name}", *extra])
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def assert_steps_match(ref: dict, got: dict, keys, tol: float, label: str) -> None:
    """Every step of got against the same step of ref, key by key, within tol relative."""
    for step in got:
        for key in keys:
            assert rel(got[step][key], ref[step][key]) < tol, (label, step, key, got[step][key], ref[step][key])


def assert_validation_matches(ref_run: Path, got_run: Path, steps: list[int], tol: float, label: str) -> None:
    ref = read_metrics(ref_run / "metrics.jsonl", "val")
    got = read_metrics(got_run / "metrics.jsonl", "val")
    assert sorted(got) == sorted(ref) == steps
    assert_steps_match(ref, got, ("loss_mean",), tol, label)


def worst_weight_error(got: dict, ref: dict) -> tuple[str, float]:
    """The largest elementwise |got - ref| beyond 1e-5 relative, over the weights with real gradients: AdamW's first
    steps move an element by about lr whatever its gradient's size, so where a gradient is round-off small two
    layouts may differ by a fraction of one step; a wrong shard or a missed update is off by lr or more."""
    errors = {k: float(((got[k] - ref[k]).abs() - 1e-5 * ref[k].abs()).max()) for k in ref
              if not k.endswith(ZERO_GRADIENT_SUFFIXES)}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def sigterm_after_steps(run_dir: Path, args: list[str], steps: int, start_s: float, stop_s: float):
    """Start a 2-process torchrun job, send torchrun SIGTERM once `steps` steps are logged; returns (log text,
    the checkpoints it left, the last logged step)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    metrics = run_dir / "metrics.jsonl"
    cmd = train_command(2, [*args, f"output_dir={run_dir.parent}", f"name={run_dir.name}"])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_s
        while not (metrics.is_file() and len(read_metrics(metrics)) >= steps):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=stop_s)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return log.read_text(), saved, max(read_metrics(metrics))
