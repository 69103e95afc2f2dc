"""train.profile_steps through the entry point's Trainer on CPU (a summary and a Chrome trace per profiled step,
the other steps untouched), the kernel-kind table, and the loop's one-batch lookahead (resumes at the first
batch not trained on)."""
import gzip
import json

import pytest
import torch

from magi_train.config import ConfigError, SyntheticDataConfig, TrainConfig, model_preset
from magi_train.training.batch_lookahead import LookaheadBatches
from magi_train.training.profiling import kernel_kind
from magi_train.training.synthetic_batches import SyntheticBatches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profiled_step_writes_its_summary_and_trace(tmp_path):
    from magi_train.training.config_loading import load_config
    from magi_train.training.loop import Trainer
    from magi_train.training.metrics import read_metrics

    cfg = load_config(["experiment=smoke", f"output_dir={tmp_path}", "train.max_steps=3", "train.profile_steps=[2]",
                       "train.progress_bar=false", "train.wandb.mode=disabled", "train.ema.enabled=false",
                       "train.checkpoint.export_at_end=false", "train.checkpoint.every_steps=0"])
    assert Trainer(cfg).fit() == 0
    prof = tmp_path / "smoke" / "profile"
    assert sorted(p.name for p in prof.iterdir()) == ["step_00000002.summary.txt", "step_00000002.trace.json.gz"]
    text = (prof / "step_00000002.summary.txt").read_text()
    assert text.startswith("step 2\n") and "kernel time by kind" in text and "aten::" in text
    events = json.loads(gzip.open(prof / "step_00000002.trace.json.gz").read())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events)
    assert sorted(read_metrics(tmp_path / "smoke" / "metrics.jsonl")) == [1, 2, 3]


def test_profile_steps_are_checked():
    with pytest.raises(ConfigError, match="train.profile_steps: must be a list of step numbers >= 1"):
        TrainConfig(profile_steps=[0])


def test_kernel_kinds():
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert kernel_kind("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN") == "gemm"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "gemm"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert kernel_kind("triton_poi_fused_add_mul_0") == "fused elementwise (inductor)"
    assert kernel_kind("triton_red_fused_native_layer_norm_1") == "fused reduction (inductor)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") \
        == "copy / fill"


def _synthetic(num_samples=6):
    data = SyntheticDataConfig(num_samples=num_samples, batch_size=2, latent_frames=4, latent_height=8,
                               latent_width=8, text_length=4)
    return SyntheticBatches(data, model_preset("tiny"))


def test_lookahead_state_is_the_first_batch_not_trained_on():
    a = LookaheadBatches(_synthetic())          # 3 batches an epoch: the lookahead crosses the epoch boundary
    keys = [next(a)["key"], next(a)["key"]]
    a.fetch_ahead()
    a.fetch_ahead()                             # holds one batch at most
    state = a.state_dict()
    ahead = next(a)
    b = LookaheadBatches(_synthetic())
    b.load_state_dict(state)
    again = next(b)
    assert again["key"] == ahead["key"] and torch.equal(again["latent"], ahead["latent"])
    assert ahead["key"] not in keys
    for _ in range(4):                          # after the lookahead both go on alike, over the next epoch
        x, y = next(a), next(b)
        assert x["key"] == y["key"]


def test_lookahead_restarts_a_finite_loader():
    class Finite:
        def __init__(self):
            self.pos = 0

        def __iter__(self):
            for i in range(2):
                self.pos = i + 1
                yield {"i": i}

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, sd):
            self.pos = sd["pos"]

    it = LookaheadBatches(Finite())
    seen = [next(it)["i"]]
    it.fetch_ahead()
    seen += [next(it)["i"], next(it)["i"]]
    assert seen == [0, 1, 0]
