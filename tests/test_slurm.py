"""slurm/*.sbatch under a faked Slurm: SLURM_* variables and stub srun/scontrol that print what they get."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"train": "magi_train.train", "distill": "magi_train.distill", "eval": "magi_eval",
           "infer": "magi_infer"}


def _stubs(tmp_path, scontrol: bool, srun_body: str = 'echo "SRUN $*"') -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/usr/bin/env bash\n{srun_body}\n")
    if scontrol:
        (bin_dir / "scontrol").write_text(
            "#!/usr/bin/env bash\n"
            'if [[ "$1 $2" == "show hostnames" ]]; then python3 "$MAGI_ROOT/slurm/hostlist.py" "$3"; '
            f'else echo "SCONTROL $*" >> "{tmp_path}/scontrol.log"; fi\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _env(tmp_path, bin_dir, nodes: int, nodelist: str) -> dict:
    python_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}:{python_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "MAGI_ROOT": str(ROOT),
            "MAGI_LOG_DIR": str(tmp_path / "logs"), "MAGI_VENV": str(tmp_path / "no-venv"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "magi-train", "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}


def _srun_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("SRUN "))


@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("nodes,nodelist,first", [(1, "gpu05", "gpu05"), (2, "gpu[07-08]", "gpu07")])
def test_one_torchrun_per_node_with_rendezvous_and_overrides(tmp_path, kind, nodes, nodelist, first):
    bin_dir = _stubs(tmp_path, scontrol=kind == "train")      # train: scontrol; others: the Python fallback
    proc = subprocess.run(["bash", str(ROOT / "slurm" / f"{kind}.sbatch"), "experiment=demo", "parallel.tp=8",
                           "data.caption=a b"], env=_env(tmp_path, bin_dir, nodes, nodelist),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    srun = _srun_line(proc.stdout)
    assert f"--nodes={nodes} --ntasks={nodes} --ntasks-per-node=1" in srun
    expected = (f"torchrun --nnodes={nodes} --nproc-per-node=8 --rdzv-backend=c10d "
                f"--rdzv-endpoint={first}:24242 --rdzv-id=4242")
    assert expected in srun
    assert srun.endswith(f"-m {MODULES[kind]} experiment=demo parallel.tp=8 data.caption=a b")
    assert (tmp_path / "logs" / "magi-train-4242").is_dir()


def test_hostlist_expansion():
    sys.path.insert(0, str(ROOT / "slurm"))
    from hostlist import expand

    assert expand("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand("a[8-10]-ib") == ["a8-ib", "a9-ib", "a10-ib"]


def test_time_limit_signal_stops_for_a_checkpoint_and_requeues(tmp_path):
    # srun stub: runs until SIGTERM (what the trainer gets to write its checkpoint), then says so
    body = ('trap \'echo "TASKS GOT SIGTERM"; exit 0\' TERM\n'
            'echo "SRUN started"\nwhile true; do sleep 0.1; done')
    bin_dir = _stubs(tmp_path, scontrol=True, srun_body=body)
    proc = subprocess.Popen(["bash", str(ROOT / "slurm" / "train.sbatch"), "experiment=demo"],
                            env=_env(tmp_path, bin_dir, 1, "gpu01"), stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (tmp_path / "logs" / "magi-train-4242").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)       # Slurm's --signal=B:USR1@300
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "TASKS GOT SIGTERM" in out and "time limit near" in out
    assert "SCONTROL requeue 4242" in (tmp_path / "scontrol.log").read_text()
