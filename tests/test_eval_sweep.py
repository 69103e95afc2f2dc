"""python -m magi_eval --multirun over 2 checkpoints x 2 step counts of the embedded default's model on CPU: killed
inside its second cell, rerun, only the missing cells run; the table has 4 rows and the plots exist. Bad
checkpoints stop with one line."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval_fixture import make_eval_fixture

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_eval_fixture(tmp_path_factory.mktemp("eval"))


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _cmd(fx, sweep: Path, *extra: str) -> list[str]:
    a, b = fx["checkpoints"]
    return [sys.executable, "-m", "magi_eval", "--multirun", f"checkpoint={a},{b}", "sampler.num_steps=2,4",
            f"infer_config={fx['infer_config']}", f"clips.path={fx['clips']}", f"sweep_dir={sweep}",
            "progress=false", *extra]


def _complete(sweep: Path) -> dict[str, float]:
    return {f.parent.name: json.loads(f.read_text())["finished"] for f in (sweep / "cells").glob("*/cell.json")
            if not f.parent.name.startswith(".")}


@pytest.mark.timeout(300)
def test_interrupted_sweep_reruns_only_missing_cells(fx, tmp_path):
    sweep = tmp_path / "sweep"
    # first run: the second cell (step 10, 4 steps) stalls after writing its files, before its rename; kill it there
    proc = subprocess.Popen(_cmd(fx, sweep), cwd=ROOT, env=_env(MAGI_FAULT_STALL_CELL="step_00000010_num_steps-4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not list((sweep / "cells").glob("stalled_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    out = proc.communicate()[0]
    assert list((sweep / "cells").glob("stalled_*")), out[-3000:]
    first = _complete(sweep)
    assert len(first) == 1 and "step_00000010_num_steps-2" in next(iter(first)), first
    assert len(list((sweep / "cells").glob(".stage-*"))) == 1     # the killed cell: written but never renamed

    again = subprocess.run(_cmd(fx, sweep), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 1
    done = _complete(sweep)
    assert len(done) == 4
    name = next(iter(first))
    assert done[name] == first[name]                              # the complete cell was not run again
    assert not list((sweep / "cells").glob(".stage-*"))           # the torn one was redone and its staging removed

    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert len(rows) == 4
    assert sorted((int(r["training_step"]), int(r["num_steps"])) for r in rows) == [(10, 2), (10, 4), (20, 2), (20, 4)]
    for r in rows:
        assert float(r["psnr_mean"]) > 0 and r["psnr_ci95"] and float(r["seconds_per_chunk"]) > 0
        assert float(r["forwards_per_chunk"]) >= 1 and float(r["frames_per_second"]) > 0
    table = (sweep / "results.md").read_text()
    assert sum(1 for line in table.splitlines() if line.startswith("| step ")) == 4
    for plot in ("metric_vs_num_steps.png", "metric_vs_training_step.png", "pareto.png", "grid.png"):
        assert (sweep / plot).stat().st_size > 5000, plot
    assert (sweep / "grid.mp4").stat().st_size > 1000
    assert "fvd: skipped" in again.stdout

    # the standalone aggregate over the same directory writes the same table
    (sweep / "results.md").unlink()
    agg = subprocess.run([sys.executable, "-m", "magi_eval.aggregate", str(sweep), "--quality", "traj_err_px"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert agg.returncode == 0, agg.stderr[-2000:]
    assert (sweep / "results.md").read_text() == table


def _one_line_error(fx, tmp_path, checkpoint, *extra):
    proc = subprocess.run([sys.executable, "-m", "magi_eval", f"checkpoint={checkpoint}",
                           f"infer_config={fx['infer_config']}", f"clips.path={fx['clips']}",
                           f"sweep_dir={tmp_path / 'bad'}", "progress=false", *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint:"), proc.stderr
    return lines[0]


def test_missing_checkpoint_is_one_line(fx, tmp_path):
    assert "does not exist" in _one_line_error(fx, tmp_path, tmp_path / "nope")


def test_checkpoint_of_another_model_is_one_line(fx, tmp_path):
    line = _one_line_error(fx, tmp_path, fx["checkpoints"][0], "infer_overrides=['model.hidden_size=64']")
    assert "does not fit the model" in line and "hidden_size" in line


@pytest.mark.timeout(300)
def test_submitit_launcher_runs_each_cell_as_its_own_job(fx, tmp_path):
    # submitit_local is submitit_slurm's stand-in on a machine without Slurm: each cell a separate job
    # process, the progress and the aggregate in the launching process
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "magi_eval", "--multirun", "hydra/launcher=submitit_local",
                           "hydra.launcher.timeout_min=5", f"checkpoint={fx['checkpoints'][1]}",
                           f"infer_config={fx['infer_config']}", f"clips.path={fx['clips']}", "clips.max_clips=1",
                           f"sweep_dir={sweep}", "progress=false"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(_complete(sweep)) == 1
    assert len(list(csv.DictReader(open(sweep / "results.csv")))) == 1
    assert list((sweep / ".submitit").glob("*/*_log.out"))             # it ran as a submitit job


@pytest.mark.timeout(300)
def test_training_checkpoint_scores_as_its_export(fx, tmp_path, one_thread):
    # a DCP training checkpoint is read for its EMA weights: the same model as the float32 EMA export beside it
    import dataclasses

    from magi_train.training import Trainer
    from magi_train.training.config_loading import load_config

    cfg = load_config(["experiment=smoke", f"output_dir={tmp_path}", "train.max_steps=2", "train.progress_bar=false",
                       "train.checkpoint.every_steps=2", "train.checkpoint.export_dtype=float32",
                       "train.validation.every_steps=0"])
    assert Trainer(cfg).fit() == 0
    run = tmp_path / "smoke"
    infer = tmp_path / "infer.json"
    infer.write_text(json.dumps({"model": dataclasses.asdict(cfg.model), "video_size_h": 32, "video_size_w": 32,
                                 "fps": 8, "num_steps": 2, "window_size": 2, "cfg_number": 1,
                                 "noise2clean_kvrange": [], "temporal_downsample_factor": 1, "device": "cpu"}))
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "magi_eval", "--multirun",
                           f"checkpoint={run / 'checkpoints' / 'step_00000002'},{run / 'export' / 'step_00000002'}",
                           f"infer_config={infer}", f"clips.path={fx['clips']}", f"sweep_dir={sweep}",
                           "progress=false"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = [json.loads(f.read_text()) for f in sorted((sweep / "cells").glob("[!.]*/cell.json"))]
    assert len(cells) == 2 and {c["training_step"] for c in cells} == {2}
    a, b = (c["per_clip"] for c in cells)
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4)


def test_shards_split_the_cells_between_processes(fx, tmp_path):
    # one sweep process per GPU: shard=i/N runs the cells hashing to i; together they run each cell once
    sweep = tmp_path / "sweep"
    first = subprocess.run(_cmd(fx, sweep, "shard=0/2"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    mine = _complete(sweep)
    assert first.stdout.count("leaves it to another process") == 4 - len(mine)
    second = subprocess.run(_cmd(fx, sweep, "shard=1/2"), cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    done = _complete(sweep)
    assert len(done) == 4 and all(done[k] == v for k, v in mine.items())
    assert second.stdout.count("complete, skipped") == len(mine)
