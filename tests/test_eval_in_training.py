"""train.evaluation.*: generation inside training with the EMA weights, scores in metrics.jsonl, one video kept;
the continuation sampler keeps the prefix and lands on the truth for a model that predicts the true velocity."""
import json

import numpy as np
import pytest
import torch

from magi_train.config import ConfigError
from magi_train.encoders import VAEConfig, build_vae
from magi_train.training import Trainer
from magi_train.training.config_loading import load_config
from magi_train.training.periodic_eval import continue_latent, ema_weights
from magi_train.training.ema import EMA


class _Oracle(torch.nn.Module):
    """Predicts v = x1 - noise exactly for a known clean latent: the Euler steps must end on x1."""

    def __init__(self, x1):
        super().__init__()
        self.x1 = x1
        self.calls = []

    def forward(self, x, t, caption, caption_mask, dropped):
        self.calls.append((t.clone(), dropped.clone()))
        tt = t.repeat_interleave(2, dim=1)[:, None, :, None, None]
        x1 = self.x1[:, :, :x.shape[2]]
        noise = (x - tt * x1) / (1 - tt).clamp(min=1e-6)
        return x1 - noise


def test_continuation_keeps_prefix_and_reaches_truth_with_an_oracle():
    x1 = torch.randn(1, 4, 6, 4, 4)
    oracle = _Oracle(x1)
    out = continue_latent(oracle, x1, torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), chunk_width=2,
                          prefix_chunks=1, num_steps=4, shift=3.0, seed=0, clean_t=0.9999,
                          null_caption_on_clean=True)
    assert torch.equal(out[:, :, :2], x1[:, :, :2])                  # the clean prefix is kept
    assert torch.allclose(out, x1, atol=1e-3)                        # Euler on the exact velocity ends on the truth
    assert len(oracle.calls) == 2 * 4                                # 2 generated chunks x 4 steps
    t, dropped = oracle.calls[-1]
    assert t.shape == (1, 3) and torch.allclose(t[0, :2], torch.tensor(0.9999)) and dropped[0].tolist() == [1, 1, 0]


def test_ema_weights_are_swapped_in_and_restored():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.5)
    for v in ema.shadow.values():
        v.fill_(3.0)
    before = m.weight.detach().clone()
    with ema_weights(m, ema):
        assert torch.all(m.weight == 3.0)
    assert torch.equal(m.weight, before)


def test_training_logs_evaluation_scores_and_keeps_a_video(tmp_path, one_thread):
    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    build_vae(VAEConfig(kind="small", latent_channels=16, spatial_downsample_factor=8, temporal_downsample_factor=1,
                        base_channels=8)).save_pretrained(str(vae_dir))
    cfg = load_config(["experiment=smoke", f"output_dir={tmp_path}", "train.max_steps=4", "train.progress_bar=false",
                       "train.evaluation.every_steps=2", "train.evaluation.clips=2", "train.evaluation.num_steps=2",
                       "train.validation.every_steps=0", "train.checkpoint.export_at_end=false",
                       "encoders.vae.kind=small", f"encoders.vae.path={vae_dir}"])
    assert Trainer(cfg).fit() == 0
    run = tmp_path / "smoke"
    evals = [json.loads(ln) for ln in open(run / "metrics.jsonl") if '"eval"' in ln]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        assert e["weights"] == "ema" and e["latent_mse"] > 0 and 0 < e["psnr"] < 100 and e["ssim"] <= 1
    videos = sorted((run / "evaluation").glob("step_*.mp4"))
    assert [v.name for v in videos] == ["step_00000002.mp4", "step_00000004.mp4"]


def test_evaluation_needs_one_process():
    from magi_train.training.periodic_eval import build_periodic_eval

    cfg = load_config(["experiment=smoke", "train.evaluation.every_steps=2"])
    with pytest.raises(ConfigError, match="train.evaluation.every_steps"):
        build_periodic_eval(cfg, None, torch.device("cpu"), None, lambda b: b, parallel=True)
