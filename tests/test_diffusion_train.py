"""Training side of magi_train.diffusion: per-chunk t sampler, clean prefixes, inputs, targets and the loss."""
import math

import pytest
import torch

from magi_train.config import ConfigError, FlowMatchingConfig
from magi_train.diffusion import (
    ChunkNoise,
    FlowMatchingLoss,
    TBinStats,
    chunk_mse,
    loss_from_output,
    prepare_inputs,
    sample_chunk_t,
    t_quantile,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ks_pvalue(sample: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov test (asymptotic p-value); no scipy in the environment."""
    x = torch.sort(sample.double().flatten()).values
    n = x.numel()
    f = torch.as_tensor(cdf(x), dtype=torch.float64)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = max((i / n - f).max().item(), (f - (i - 1) / n).max().item())
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return min(max(p, 0.0), 1.0)


# Analytic CDFs written independently of t_sampler's quantile functions.
def _unshift(t, s):
    return s * t / (1 + (s - 1) * t)


def cdf_uniform(t, cfg):
    return _unshift(t, cfg.shift)


def cdf_logit_normal(t, cfg):
    u = _unshift(t, cfg.shift)
    return torch.special.ndtr((torch.logit(u, eps=1e-12) - cfg.logit_mean) / cfg.logit_std)


def cdf_inference(t, cfg):
    return _unshift(t, cfg.shift) ** (1.0 / cfg.inference_power)


CASES = [
    (FlowMatchingConfig(t_distribution="uniform"), cdf_uniform),
    (FlowMatchingConfig(t_distribution="uniform", shift=3.0), cdf_uniform),
    (FlowMatchingConfig(t_distribution="logit_normal", logit_mean=0.4, logit_std=0.8), cdf_logit_normal),
    (FlowMatchingConfig(t_distribution="inference", shift=3.0), cdf_inference),
]


@pytest.mark.parametrize("schedule", ["sorted", "shared", "staggered"])
@pytest.mark.parametrize("dist", ["uniform", "logit_normal", "inference"])
def test_t_is_monotone_for_every_sample(schedule, dist):
    cfg = FlowMatchingConfig(t_distribution=dist, chunk_schedule=schedule, shift=2.0, clean_prefix_prob=0.4,
                             max_clean_prefix_chunks=3)
    for n in (1, 2, 5):
        noise = sample_chunk_t(3000, n, cfg, _gen(n))
        assert noise.t.shape == (3000, n)
        assert (noise.t[:, :-1] >= noise.t[:, 1:]).all(), "a later chunk is cleaner than an earlier one"
        assert ((noise.t >= 0) & (noise.t <= cfg.clean_t)).all()


@pytest.mark.parametrize("cfg,cdf", CASES, ids=["uniform", "uniform-shift3", "logit_normal", "inference-shift3"])
def test_pooled_t_follows_configured_distribution(cfg, cdf):
    # sorted iid draws: the multiset of all chunks' t is a plain sample of the distribution
    t = sample_chunk_t(4000, 4, cfg, _gen(1)).t.flatten().double()
    p_value = ks_pvalue(t, lambda x: cdf(x, cfg))
    assert p_value > 1e-3, f"KS test rejects the configured distribution (p={p_value:.2e})"
    # and the test has power: another configuration's CDF is rejected on the same sample
    other = FlowMatchingConfig(t_distribution="uniform", shift=1.5 if cfg.shift == 1 else 1.0)
    wrong = ks_pvalue(t, lambda x: cdf_uniform(x, other))
    assert wrong < 1e-6


def test_shared_schedule_marginal_and_equal_chunks():
    cfg = FlowMatchingConfig(t_distribution="logit_normal", chunk_schedule="shared")
    t = sample_chunk_t(5000, 3, cfg, _gen(2)).t
    assert (t == t[:, :1]).all()
    assert ks_pvalue(t[:, 0], lambda x: cdf_logit_normal(x, cfg)) > 1e-3


def test_staggered_chunks_lag_by_one_window_step():
    cfg = FlowMatchingConfig(t_distribution="uniform", chunk_schedule="staggered", stagger_window=4)
    t = sample_chunk_t(2000, 4, cfg, _gen(3)).t
    both = (t[:, 1:] > 0)
    gaps = (t[:, :-1] - t[:, 1:])[both]
    assert torch.allclose(gaps, torch.full_like(gaps, 0.25), atol=1e-6)
    assert ks_pvalue(t[:, 0], lambda x: x) > 1e-3


def test_clean_prefix_rate_and_length_as_configured():
    cfg = FlowMatchingConfig(clean_prefix_prob=0.3, max_clean_prefix_chunks=2)
    B = 20000
    noise = sample_chunk_t(B, 4, cfg, _gen(4))
    k = noise.clean.sum(1)
    rate = (k > 0).float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / B)
    # lengths uniform on {1, 2}; clean chunks are a prefix and carry t = clean_t
    assert set(k.unique().tolist()) == {0, 1, 2}
    ones, twos = (k == 1).sum().item(), (k == 2).sum().item()
    assert abs(ones / (ones + twos) - 0.5) < 4 * math.sqrt(0.25 / (ones + twos))
    idx = torch.arange(4)[None]
    assert (noise.clean == (idx < k[:, None])).all()
    assert (noise.t[noise.clean] == cfg.clean_t).all()
    # never a sample without any noisy chunk, even with one chunk only
    assert not sample_chunk_t(500, 1, FlowMatchingConfig(clean_prefix_prob=1.0), _gen(5)).clean.any()


def test_quantile_matches_inference_time_grid():
    from magi_train.diffusion import time_grid
    cfg = FlowMatchingConfig(t_distribution="inference", shift=3.0, inference_power=2.0)
    p = torch.linspace(0, 1, 17)
    assert torch.allclose(t_quantile(p, cfg), time_grid(16, shift=3.0), atol=1e-6)


def _batch(B=3, frames=12, L=5, D=64, seed=0):
    g = _gen(seed)
    return {"latent": torch.randn(B, 16, frames, 4, 4, generator=g), "text_emb": torch.randn(B, L, D, generator=g),
            "text_mask": torch.ones(B, L, dtype=torch.bool), "caption": ["a"] * B, "key": ["k"] * B}


def test_prepare_inputs_builds_flow_matching_pairs():
    cfg = FlowMatchingConfig(clean_prefix_prob=0.5, caption_dropout=0.5)
    batch = _batch(B=64)
    kw, target, weight = prepare_inputs(batch, _gen(7), cfg, chunk_width=6)
    kw2, target2, weight2 = prepare_inputs(batch, _gen(7), cfg, chunk_width=6)
    assert all(torch.equal(kw[k], kw2[k]) for k in kw) and torch.equal(target, target2), "not deterministic"
    x1 = batch["latent"]
    noise = x1 - target                                  # target = x1 - noise
    t = kw["t"].repeat_interleave(6, dim=1)[:, None, :, None, None]
    clean = (weight == 0).repeat_interleave(6, dim=1)[:, None, :, None, None].expand_as(x1)
    expected = t * x1 + (1 - t) * noise
    assert torch.allclose(kw["x"][~clean], expected[~clean], atol=1e-6)
    assert torch.equal(kw["x"][clean], x1[clean]), "clean chunks must be the data itself"
    assert torch.equal(weight == 0, kw["t"] == cfg.clean_t)
    assert 0.3 < kw["caption_dropped"].float().mean() < 0.7
    assert abs(noise.std().item() - 1) < 0.05


def test_loss_ignores_clean_chunks_and_is_mse_elsewhere():
    batch = _batch(B=2)
    kw, target, weight = prepare_inputs(batch, _gen(0), FlowMatchingConfig(), chunk_width=6)
    weight = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    v = target + 0.1 * torch.randn(target.shape, generator=_gen(1))
    loss = loss_from_output(v, target, weight)
    v_changed = v.clone()
    v_changed[:, :, :6] += 100.0                            # garbage in the clean chunk
    assert torch.equal(loss_from_output(v_changed, target, weight), loss)
    assert torch.allclose(loss, ((v - target)[:, :, 6:] ** 2).mean())
    assert chunk_mse(v, target, 2).shape == (2, 2)
    fn = FlowMatchingLoss()
    assert torch.equal(fn(v, target, weight), loss) and len(fn.pop()) == 1


def test_chunk_width_must_divide_frames():
    with pytest.raises(ValueError, match="model.chunk_width"):
        prepare_inputs(_batch(frames=10), _gen(0), FlowMatchingConfig(), chunk_width=6)


def test_t_bin_stats():
    s = TBinStats([0.5])
    loss, t = torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[0.9, 0.2], [0.6, 0.1]])
    s.add(loss, t, torch.tensor([[1, 1], [0, 1]]))
    assert s.summary() == {"t0.00-0.50": 5.0, "t0.50-1.00": 1.0}


def test_flow_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="train.flow.t_distribution"):
        FlowMatchingConfig(t_distribution="gaussian")
    with pytest.raises(ConfigError, match="train.flow.clean_prefix_prob"):
        FlowMatchingConfig(clean_prefix_prob=1.5)
    with pytest.raises(ConfigError, match="train.flow.shift"):
        FlowMatchingConfig(shift=0.5)


def test_chunk_noise_override_for_fixed_t():
    levels = ChunkNoise(t=torch.full((2, 2), 0.5), clean=torch.zeros(2, 2, dtype=torch.bool))
    kw, target, weight = prepare_inputs(_batch(B=2), _gen(0), FlowMatchingConfig(), 6, noise_levels=levels,
                                        caption_dropout=0.0)
    assert (kw["t"] == 0.5).all() and not kw["caption_dropped"].any() and (weight == 1).all()
