"""The one training path: checkpoints written by the earlier one-process format (whole tensors under model.*,
optimizer.state.*, a rank entry holding RNG and data position) still resume, and continue exactly."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from magi_train.training import Trainer, read_metrics
from magi_train.checkpoint.manager import pack_rank_state, rank_key, rng_state
from magi_train.training.config_loading import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["experiment=smoke", "train.checkpoint.every_steps=2", "train.validation.every_steps=0",
        "train.checkpoint.export_at_end=false", "train.device=cpu", "train.precision=fp32",
        "train.progress_bar=false", "train.wandb.mode=disabled", "train.grad_accum_steps=2", "data.num_samples=6",
        "data.latent_frames=12"]


def _trainer(out, name, steps, **kw):
    return Trainer(load_config([*ARGS, f"output_dir={out}", f"name={name}", f"train.max_steps={steps}"]))


def _write_old_format(trainer: Trainer, path) -> None:
    """What the one-process path of earlier versions saved (training/loop.py before the one-path change)."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_sd, "optimizer": optim_sd,
             "scheduler": pack_rank_state(trainer.scheduler.state_dict()),
             "trainer": {"step": trainer.step, "world_size": 1},
             rank_key(0): pack_rank_state({"rng": rng_state(), "data": trainer.loader.state_dict()}),
             "ema": {"updates": trainer.ema.updates, "shadow": dict(trainer.ema.shadow)}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def test_one_process_format_of_earlier_versions_resumes_exactly(tmp_path):
    ref = _trainer(tmp_path, "ref", 4)
    assert ref.fit() == 0
    first = _trainer(tmp_path, "old", 2)
    assert first.fit() == 0
    ckpt = tmp_path / "old" / "checkpoints"
    new_format = ckpt / "step_00000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000002"]
    for f in new_format.iterdir():
        f.unlink()
    new_format.rmdir()
    _write_old_format(first, new_format)
    weights = {n: p.detach().clone() for n, p in first.runtime.named_parameters()}
    first.close()

    resumed = _trainer(tmp_path, "old", 4)
    assert resumed.step == 2
    for n, p in resumed.runtime.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert resumed.fit() == 0
    a, b = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(tmp_path / "old" / "metrics.jsonl")
    for step in (3, 4):
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"]), step
