"""python -m magi_train.plan: the per-GPU memory estimate against measured peaks, and the command line."""
import pytest
import torch

from magi_train.config import ConfigError, model_preset
from magi_train.config.parallel_config import ParallelConfig
from magi_train.parallel.memory_estimate import StepShape, _per_token_layer, estimate, measure_peak

TINY = model_preset("tiny", chunk_width=2, attention_backend="sdpa_chunked")
MID = model_preset("debug", chunk_width=2, attention_backend="sdpa_chunked", hidden_size=384, num_attention_heads=6,
                   num_query_groups=2, kv_channels=64, ffn_hidden_size=1536, num_layers=4, caption_channels=256)


@pytest.mark.parametrize("name,cfg,shape", [
    ("tiny", TINY, StepShape(4, 32, 32, batch_size=1, microbatches=1, caption_len=8)),      # activations dominate
    ("mid", MID, StepShape(4, 16, 16, batch_size=2, microbatches=1, caption_len=16)),      # 10M params
])
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_estimate_within_15_percent_of_measured_peak_cpu(name, cfg, shape, recompute):
    measured = measure_peak(cfg, shape, precision="fp32", recompute=recompute)
    est = estimate(cfg, ParallelConfig(), 1, shape, precision="fp32")
    predicted = est.peak_for(recompute)
    assert abs(predicted - measured) / measured < 0.15, (name, recompute, predicted / 2**20, measured / 2**20)


def test_layer_coefficients_still_match_the_block():
    """The activation bytes per token are fitted to magi_train/model/block.py; re-measure one layer."""
    from magi_train.model import build_dit
    from magi_train.parallel.memory_tracker import LiveBytes

    cfg = model_preset("tiny", chunk_width=2, attention_backend="sdpa_chunked", gated_linear_unit=True,
                       hidden_size=192, num_attention_heads=6, ffn_hidden_size=384)
    model = build_dit(cfg)
    x, t, cap = torch.randn(1, 16, 4, 32, 32), torch.rand(1, 2), torch.randn(1, 8, 64)   # 1024 tokens
    ctx, _ = model.build_context(x.shape, t, cap)
    h = model.embed_tokens(x).detach().requires_grad_(True)
    with LiveBytes() as mt:
        base = mt.current
        out = model.videodit_blocks.layers[0](h, ctx)      # keeps the graph (and what it saved) alive
        per_token = (mt.current - base) / h.shape[0]
    del out
    d_part, rest, _ = _per_token_layer(cfg, 1, "fp32")
    assert abs(d_part + rest - per_token) / per_token < 0.05, (d_part + rest, per_token)


def test_parallel_layout_divides_the_memory():
    cfg = model_preset("24B")
    shape = StepShape(24, 90, 160, batch_size=1, microbatches=8, caption_len=800)   # 720p, 96 frames
    one = estimate(cfg, ParallelConfig(tp=8, dp=1), 8, shape)
    assert one.tokens_per_sample == 86400
    full = estimate(cfg, ParallelConfig(tp=8, pp=2, cp=2, pp_microbatches=8), 64, shape)
    assert full.weights < one.weights / 7                  # FSDP over dp*cp=4 and half the layers
    assert full.activations < one.activations
    sp = estimate(cfg, ParallelConfig(tp=8, pp=2, cp=2, pp_microbatches=8, sequence_parallel=True), 64, shape)
    assert sp.activations < full.activations / 3           # the residual stream split over TP
    assert full.activations_ckpt < full.activations / 5
    assert full.flops_per_step == pytest.approx(one.flops_per_step * 2)   # dp=2 doubles the samples per step
    with pytest.raises(ConfigError, match="parallel.dp"):
        estimate(cfg, ParallelConfig(tp=8, dp=3), 8, shape)


def test_plan_command_prints_the_table(capsys):
    from magi_train.plan import main

    rc = main(["model=24B", "parallel.tp=8", "parallel.pp=2", "parallel.cp=2", "parallel.pp_microbatches=8",
               "world_size=64", "data.resolution=[720,1280]", "data.num_frames=96",
               "train.recompute=selective", "train.recompute_every=2"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("weights", "gradients", "optimizer states", "activations (recompute none)",
                 "activations (recompute full, every 2)", "activations (recompute selective, every 2)",
                 "FLOPs per step", "86400", "train.recompute=selective (every 2)", "fit"):
        assert word in out
    assert main(["model=24B", "train.recompute=some"]) == 2
    assert "train.recompute: got 'some'" in capsys.readouterr().err
    assert main(["model=24B", "parallel.tp=3"]) == 2
    assert "parallel.tp" in capsys.readouterr().err
    assert main(["modle=24B"]) == 2
    assert "modle: unknown key" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_estimate_within_15_percent_of_measured_peak_gpu(recompute):
    cfg = model_preset("debug", attention_backend="sdpa_chunked", hidden_size=1024, num_attention_heads=16,
                       num_query_groups=4, kv_channels=64, ffn_hidden_size=4096, num_layers=8,
                       gated_linear_unit=True, params_dtype="bfloat16", caption_channels=512, chunk_width=6)
    shape = StepShape(12, 64, 64, batch_size=1, microbatches=2, caption_len=64)
    measured = measure_peak(cfg, shape, precision="bf16", recompute=recompute, device="cuda")
    est = estimate(cfg, ParallelConfig(), 1, shape, precision="bf16")
    predicted = est.peak_for(recompute)
    assert abs(predicted - measured) / measured < 0.15, (recompute, predicted / 2**20, measured / 2**20)


def test_extra_blocks_add_their_kept_outputs_and_the_plan_says_how_many_fit(capsys):
    """train.recompute_keep_extra / recompute_extra_blocks: k blocks hold fc1's output as well (the last one's is
    reused by its own recompute, which runs at the peak), the FLOPs run again drop by k fc1 forwards, and the plan
    prints the most blocks that fit; on CPU (a shape where activations make the peak) the peak grows by what the
    estimate adds, within 15 %."""
    from magi_train.parallel.memory_estimate import recompute_flops
    from magi_train.parallel.recompute import RecomputePolicy
    from magi_train.plan import main
    from magi_train.training.flops import layer_linear_flops

    cfg = model_preset("4.5B")
    shape = StepShape(24, 60, 104, caption_len=64)
    base = estimate(cfg, ParallelConfig(), 1, shape)
    fc1 = 37440 * cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1) * 2     # bf16 GEMM output
    for k in (1, 12):
        more = estimate(cfg, ParallelConfig(), 1, shape, recompute_extra=("fc1",), recompute_extra_blocks=k)
        assert more.activations_selective - base.activations_selective == pytest.approx((k - 1) * fc1)
        policy = RecomputePolicy("selective", extra=("fc1",), extra_blocks=k)
        saved = recompute_flops(cfg, 24, 60, 104, 64, RecomputePolicy("selective")) - \
            recompute_flops(cfg, 24, 60, 104, 64, policy)
        assert saved == pytest.approx(k * layer_linear_flops(cfg, 24, 60, 104, 64)["fc1"])
    argv = ["model.preset=4.5B", "model.params_dtype=float32", "data.latent_frames=24", "data.latent_height=60",
            "data.latent_width=104", "data.text_length=64", "gpu_memory_gib=130", "train.recompute=selective",
            "train.recompute_keep_extra=[fc1]"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    k = int(out.split("at most train.recompute_extra_blocks=")[1].split()[0])
    cfg32 = model_preset("4.5B", params_dtype="float32")
    fits = estimate(cfg32, ParallelConfig(), 1, shape, recompute_extra=("fc1",), recompute_extra_blocks=k)
    too_many = estimate(cfg32, ParallelConfig(), 1, shape, recompute_extra=("fc1",), recompute_extra_blocks=k + 1)
    assert 0 < k < 34 and fits.peak_selective <= 130 * 2**30 < too_many.peak_selective
    small = StepShape(4, 32, 32, batch_size=1, microbatches=1, caption_len=8)
    extra = dict(recompute_extra=("fc1",), recompute_extra_blocks=TINY.num_layers)
    measured = [measure_peak(TINY, small, precision="fp32", recompute="selective", **kw) for kw in ({}, extra)]
    predicted = [estimate(TINY, ParallelConfig(), 1, small, precision="fp32", **kw).peak_selective
                 for kw in ({}, extra)]
    grew, estimated = measured[1] - measured[0], predicted[1] - predicted[0]
    assert grew > 0 and abs(estimated - grew) / grew < 0.15, (grew / 2**20, estimated / 2**20)


def test_selective_keep_adds_the_kept_gemm_outputs():
    """train.recompute_keep: the estimate adds each kept linear's output per recomputed block; within 15 % of a CPU
    step."""
    cfg = model_preset("4.5B")
    shape = StepShape(24, 60, 104, caption_len=64)
    base = estimate(cfg, ParallelConfig(), 1, shape, recompute_keep=())
    kept = estimate(cfg, ParallelConfig(), 1, shape)                    # the default: qkv, proj, fc2
    per_block = 37440 * (2 * cfg.q_dim + 2 * cfg.kv_dim + 2 * cfg.hidden_size) * 2     # bf16 GEMM outputs
    # every block holds them, but the one running its recompute reuses its own (counted in its whole forward)
    assert kept.activations_selective - base.activations_selective == pytest.approx((cfg.num_layers - 1) * per_block)
    assert (kept.activations, kept.activations_ckpt) == (base.activations, base.activations_ckpt)
    small = StepShape(4, 16, 16, batch_size=2, microbatches=1, caption_len=16)
    keep = ("qkv", "proj", "fc2")
    measured = measure_peak(MID, small, precision="fp32", recompute="selective", recompute_keep=keep)
    predicted = estimate(MID, ParallelConfig(), 1, small, precision="fp32", recompute_keep=keep).peak_selective
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20)
