"""The equivalence and resharding checks of test_parallel_equivalence.py on GPUs with NCCL (fp32, TF32 off),
plus the layouts only CUDA runs (sequence parallelism, FSDP CPU offload). Needs 2 (and for some, 4) GPUs."""
import json
import os
import subprocess
import sys

import pytest
import torch

TOL = 1e-5
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _torchrun(nproc, args, tmp_path):
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "magi_train.parallel.equivalence", "--out", str(out), "--dir", str(tmp_path / "scratch"), *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "4"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def _check(results):
    for r in results:
        if "layout" in r:
            assert r["loss_rel"] < TOL and r["grad_rel_max"] < TOL, r
            assert r["forward_rel"] < TOL and r["kv_forward_rel"] < TOL, r
        else:
            assert r["forward_rel"] < TOL and r.get("exp_avg_rel", 0.0) < TOL, r


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_layouts_match_one_process(tmp_path):
    res = _torchrun(2, ["--layouts", "tp2,cp2,pp2,dp2,dp2_offload,tp2sp,pp2_interleaved",
                        "--reshard", "tp2:cp2+dp2+pp2"], tmp_path)
    _check(res)
    assert len([r for r in res if "layout" in r]) == 7


@pytest.mark.gpu
@pytest.mark.skipif(GPUS < 4, reason="needs 4 CUDA GPUs")
def test_four_gpu_layouts_match_one_process(tmp_path):
    res = _torchrun(4, ["--layouts", "tp2cp2,pp2dp2,tp4,tp2cp2sp,cp2dp2",
                        "--reshard", "tp2dp2:tp4+pp2dp2+cp2dp2"], tmp_path)
    _check(res)
