"""The GPU path of the loop: bf16 autocast, fused AdamW, activation checkpointing, torch.compile, MFU."""
import math

import pytest
import torch

from magi_train.training import CheckpointManager, Trainer, read_metrics
from magi_train.training.config_loading import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("compile_blocks", [False, True], ids=["eager", "compiled"])
def test_gpu_loop_bf16_fused_checkpointed(tmp_path, monkeypatch, compile_blocks):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = load_config(["experiment=smoke", f"output_dir={tmp_path}", "model=debug",
                       "model.attention_backend=sdpa_chunked",
                       "data.latent_frames=24", "data.latent_height=32", "data.latent_width=32", "data.batch_size=4",
                       "data.num_samples=16", "train.max_steps=30", "train.progress_bar=false", "train.log_every=10",
                       "train.recompute=full", f"train.compile={str(compile_blocks).lower()}",
                       "train.checkpoint.every_steps=15", "train.validation.every_steps=15",
                       "train.optimizer.lr=1e-3"])
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda" and trainer.amp_dtype == torch.bfloat16
    assert trainer.optimizer.defaults.get("fused") is True
    assert trainer.fit() == 0
    metrics = read_metrics(tmp_path / "smoke" / "metrics.jsonl")
    losses = [metrics[s]["loss"] for s in sorted(metrics)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, "bf16 training did not reduce the loss"
    last = metrics[30]
    assert last["mfu"] is not None and 0 < last["mfu"] < 1 and last["peak_mem_gib"] > 0
    assert CheckpointManager(tmp_path / "smoke" / "checkpoints").complete_steps() == [15, 30]
    print(f"compile={compile_blocks}: step {last['step_time_s'] * 1e3:.1f} ms, {last['tokens_per_s']:.0f} tok/s, "
          f"MFU {100 * last['mfu']:.2f}%, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
