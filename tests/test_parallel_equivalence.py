"""Every parallel layout against one process (gloo, CPU, fp32): same loss, every gradient, inference forwards
(plain and KV-cached), and checkpoints resharded between layouts. Each job is one torchrun; its ranks also
compute the single-process reference (magi_train/parallel/equivalence.py)."""
import json
import os
import subprocess
import sys

import pytest

TOL = 1e-5
TWO = "tp2,cp2,pp2,dp2,pp2_interleaved,dp2_ddp,cp2_none"
FOUR = "tp2cp2,pp2dp2,tp4,cp2dp2_ddp,cp4_pad"


def _torchrun(nproc: int, args: list[str], tmp_path) -> list[dict]:
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "magi_train.parallel.equivalence", "--out", str(out), "--dir", str(tmp_path / "scratch"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    return _torchrun(2, ["--layouts", TWO, "--reshard", "tp2:cp2+dp2"], tmp_path_factory.mktemp("eq2"))


@pytest.fixture(scope="module")
def four_process(tmp_path_factory):
    return _torchrun(4, ["--layouts", FOUR], tmp_path_factory.mktemp("eq4"))


def _check_layout(results, name):
    r = next(r for r in results if r.get("layout") == name)
    assert not r["missing"], r
    assert r["grads_compared"] > 100
    assert r["loss_rel"] < TOL, r
    assert r["grad_rel_max"] < TOL, r
    assert r["forward_rel"] < TOL, r
    assert r["kv_forward_rel"] < TOL, r


@pytest.mark.dist
@pytest.mark.parametrize("layout", TWO.split(","))
def test_two_process_layout_matches_one_process(two_process, layout):
    _check_layout(two_process, layout)


@pytest.mark.dist
@pytest.mark.parametrize("layout", FOUR.split(","))
def test_four_process_layout_matches_one_process(four_process, layout):
    _check_layout(four_process, layout)


@pytest.mark.dist
def test_checkpoint_saved_under_tp2_loads_under_other_layouts(two_process):
    reshard = [r for r in two_process if r.get("check") == "reshard"]
    assert {r["loaded"] for r in reshard} == {"cp2", "dp2", "single_process"}
    for r in reshard:
        assert r["forward_rel"] < TOL, r
        assert r.get("exp_avg_rel", 0.0) < TOL, r     # optimizer moments follow the weights


@pytest.mark.dist
def test_magi_export_from_tp2_loads_into_one_process(two_process):
    r = next(r for r in two_process if r.get("check") == "magi_export")
    assert r["forward_rel"] < TOL, r
