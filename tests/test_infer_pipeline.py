"""The latent pipeline on a tiny random DiT: scheduling, KV cache, CFG passes, modes, chunk-wise prompts."""
import pytest
import torch
from conftest import random_captions, tiny_infer_dit

from magi_infer.conditioning import Conditioning
from magi_infer.config import SamplerConfig
from magi_infer.pipeline import ChunkGenerator
from magi_train.diffusion.sampling import cfg_scales, euler_step, time_grid
from magi_train.model import KVCache

CW, HW = 2, (4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_infer_dit(CW)


captions = random_captions


def sampler(**kw):
    base = dict(num_steps=4, window_size=2, cfg_number=1, noise2clean_kvrange=[2, 1], clean_chunk_kvrange=1,
                distill_nearly_clean_chunk_threshold=1.0)
    return SamplerConfig(**{**base, **kw})


def run(model, s, cond, n, seed=0):
    gen = ChunkGenerator(model, s, cond, n, HW, seed=seed)
    return gen, list(gen)


def test_each_chunk_gets_num_steps_monotone_updates_and_streams_in_order(model):
    n = 4
    gen, out = run(model, sampler(num_steps=8, window_size=4, cfg_number=3), Conditioning(*captions(model, n)), n)
    assert [c.index for c in out] == list(range(n))
    assert all(c.latent.shape == (1, 16, CW, *HW) for c in out)
    for c in range(n):
        ups = [(s, a, b) for ch, s, a, b in gen.trace if ch == c]
        assert [s for s, _, _ in ups] == list(range(8))
        ts = [a for _, a, _ in ups] + [ups[-1][2]]
        assert ts[0] == 0.0 and abs(ts[-1] - 1.0) < 1e-6 and all(x < y for x, y in zip(ts, ts[1:]))
    assert gen.cache.nbytes() == 0  # everything evicted at the end


def plain_chunk_by_chunk(model, s, caption, mask, n, seed):
    """Reference: one chunk at a time; its first forward carries the previous, finished chunk at clean_t."""
    cfg = model.cfg
    x = torch.randn((1, cfg.latent_channels, n * CW, *HW), generator=torch.Generator().manual_seed(seed))
    grid = time_grid(s.num_steps, s.shift, s.time_schedule, s.shortcut_mode)
    ranges = s.noise2clean_kvrange or [0]   # 0: no limit
    per = s.num_steps // len(ranges)
    null, null_mask = model.null_caption(1, 1, caption.shape[2])
    cache = KVCache()
    kept = torch.zeros(1, dtype=torch.bool)
    for k in range(n):
        for i in range(s.num_steps):
            look = [ranges[i // per]]
            if i == 0 and k > 0:
                xin, first = x[:, :, (k - 1) * CW:(k + 1) * CW], k - 1
                t = torch.cat([torch.tensor([s.clean_t]), grid[i:i + 1]])[None]
                cap = torch.cat([null.float(), caption[:, k:k + 1]], 1)
                msk = torch.cat([null_mask, mask[:, k:k + 1]], 1)
                look = [s.clean_chunk_kvrange if ranges[0] else 0] + look
            else:
                xin, first, t = x[:, :, k * CW:(k + 1) * CW], k, grid[i:i + 1][None]
                cap, msk = caption[:, k:k + 1], mask[:, k:k + 1]
            if ranges[0]:  # free what this forward cannot see
                cache.drop_before(min(c - lb + 1 for c, lb in zip(range(first, k + 1), look)))
            v = model(xin, t, cap, msk, kept, None, chunk_offset=first, kv_cache=cache, cache_write=first < k,
                      lookback=look if ranges[0] else None)[:, :, -CW:]
            x[:, :, k * CW:(k + 1) * CW] = euler_step(x[:, :, k * CW:(k + 1) * CW], v, grid[i:i + 1], grid[i + 1:i + 2], CW)
    return x


@pytest.mark.parametrize("ranges", [[], [2, 1]])
@torch.no_grad()
def test_window_1_equals_plain_chunk_by_chunk_bit_for_bit(model, ranges):
    n = 3
    s = sampler(window_size=1, noise2clean_kvrange=ranges)
    emb, mask = captions(model, n)
    _, out = run(model, s, Conditioning(emb, mask), n, seed=3)
    ref = plain_chunk_by_chunk(model, s, emb, mask, n, seed=3)
    assert torch.equal(torch.cat([c.latent for c in out], 2), ref)


@pytest.mark.parametrize("ranges", [[], [2, 1]])
@torch.no_grad()
def test_kv_cache_velocity_equals_full_forward(model, ranges):
    n = 3
    s = sampler(window_size=1, noise2clean_kvrange=ranges)
    emb, mask = captions(model, n)
    gen = ChunkGenerator(model, s, Conditioning(emb, mask), n, HW, seed=0)
    k = 2
    idx = next(i for i, ws in enumerate(gen.schedule) if ws.chunks == (k,) and ws.substep == 1)
    for i in range(idx):
        gen.step(i)
    ws = gen.schedule[idx]
    assert gen.cache.chunks(0) and max(gen.cache.chunks(0)) == k - 1
    v_cached = gen.velocity(ws)
    t_k = gen.t_grid[ws.steps[0]]
    null, null_mask = model.null_caption(1, k, emb.shape[2])
    t = torch.cat([torch.full((k,), s.clean_t), t_k[None]])[None]
    look = None if not ranges else [s.clean_chunk_kvrange] * k + [ranges[ws.steps[0] // (s.num_steps // len(ranges))]]
    v_full = model(gen.x[:, :, :(k + 1) * CW], t, torch.cat([null.float(), emb[:, k:k + 1]], 1),
                   torch.cat([null_mask, mask[:, k:k + 1]], 1), torch.zeros(1, dtype=torch.bool), None,
                   lookback=look)[:, :, k * CW:]
    torch.testing.assert_close(v_cached, v_full, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_cfg3_velocity_is_magi1_three_pass_guidance(model):
    n = 3
    s = sampler(num_steps=8, window_size=2, cfg_number=3, noise2clean_kvrange=[3, 2])
    emb, mask = captions(model, n)
    gen = ChunkGenerator(model, s, Conditioning(emb, mask), n, HW, seed=0)
    idx = next(i for i, ws in enumerate(gen.schedule) if ws.clean_chunk is not None)
    for i in range(idx):
        gen.step(i)
    ws = gen.schedule[idx]
    inp = gen.window_input(ws)
    B = 1
    kept, dropped = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)
    null, null_mask = model.null_caption(B, inp.t.shape[1], emb.shape[2])
    kw = dict(chunk_offset=inp.first_chunk, kv_cache=gen.cache, lookback=inp.lookback)
    v_text = model(inp.x, inp.t, inp.caption, inp.caption_mask, kept, None, **kw)[:, :, CW:]
    v_ctx = model(inp.x, inp.t, null, null_mask, dropped, None, **kw)[:, :, CW:]
    v_unc = torch.cat([model(inp.x[:, :, (c + 1) * CW:(c + 2) * CW], inp.t[:, c + 1:c + 2], null[:, :1], null_mask[:, :1],
                             dropped, None)[:, :, :] for c in range(len(ws.chunks))], 2)
    sp, st = cfg_scales(inp.t[0, 1:], s.cfg_t_range, s.prev_chunk_scales, s.text_scales)
    hand = torch.cat([v_unc[:, :, c * CW:(c + 1) * CW] + sp[c] * (v_ctx - v_unc)[:, :, c * CW:(c + 1) * CW]
                      + st[c] * (v_text - v_ctx)[:, :, c * CW:(c + 1) * CW] for c in range(len(ws.chunks))], 2)
    assert (st > 0).any()  # a bin where text guidance is on
    torch.testing.assert_close(gen.velocity(ws), hand, atol=5e-5, rtol=1e-4)
    assert ws.clean_chunk in gen.cache.chunks(0)


class RecordingGenerator(ChunkGenerator):
    """Keeps each forward's guided velocity (the release formula below needs the last one of chunk 0)."""

    def velocity(self, ws):
        v = super().velocity(ws)
        self.velocities.append((ws, v.clone()))
        return v


def test_i2v_frame0_is_emitted_as_the_release_does(model):
    """MAGI-1 pads the image into every forward's input and emits frame 0 after the last Euler update:
    image + v * dt of chunk 0's last step (video_generate.py, integrate_velocity with real_start 0)."""
    n = 2
    image = torch.randn(1, 16, 1, *HW)
    s = sampler(cfg_number=2)
    gen = RecordingGenerator(model, s, Conditioning(*captions(model, n), prefix=image, emit_prefix=True), n, HW)
    gen.velocities = []
    out = list(gen)
    assert out[0].frame_start == 0 and out[0].latent.shape[2] == CW
    ws, v = next((ws, v) for ws, v in gen.velocities if ws.chunks[0] == 0 and ws.steps[0] == s.num_steps - 1)
    t = time_grid(s.num_steps, s.shift, s.time_schedule, s.shortcut_mode)
    release = image + v[:, :, :1] * (t[-1] - t[-2])
    torch.testing.assert_close(out[0].latent[:, :, :1], release, rtol=0, atol=1e-6)
    assert (out[0].latent[:, :, :1] - image).abs().max() > 1e-3  # the last step did move it

    pinned = run(model, sampler(cfg_number=2, i2v_frame0="pinned"),
                 Conditioning(*captions(model, n), prefix=image, emit_prefix=True), n)[1]
    assert torch.equal(pinned[0].latent[:, :, :1], image)
    # every other frame is the same video: the input of each forward held the image either way
    torch.testing.assert_close(pinned[0].latent[:, :, 1:], out[0].latent[:, :, 1:], rtol=0, atol=1e-6)


def test_v2v_caches_the_prefix_and_keeps_it(model):
    n_gen = 2
    prefix = torch.randn(1, 16, CW + 1, *HW)    # one whole chunk (cached) + one frame pinned in the next
    s = sampler(cfg_number=3)
    gen, out = run(model, s, Conditioning(*captions(model, n_gen), prefix=prefix), n_gen + 1)
    assert gen.first_chunk == 1 and [c.chunk for c in out] == [1, 2]
    assert out[0].frame_start == CW + 1 and out[0].latent.shape[2] == CW - 1   # prefix frames not emitted again
    assert torch.equal(gen.x[:, :, :CW], prefix[:, :, :CW])   # the cached chunk is never updated
    assert gen.cache.bytes_written > 0 and gen.forwards == len(gen.schedule) + 1  # one prefill forward


def test_chunk_wise_prompts_switch_at_the_given_chunk(model):
    n = 4
    a, ma = captions(model, 1, seed=1)
    b, mb = captions(model, 1, seed=2)
    single = Conditioning(a.expand(-1, n, -1, -1), ma.expand(-1, n, -1))
    switch = Conditioning(torch.cat([a, a, b, b], 1), torch.cat([ma, ma, mb, mb], 1))
    s = sampler(cfg_number=3, num_steps=4, window_size=2)
    _, o1 = run(model, s, single, n)
    gen, o2 = run(model, s, switch, n)
    assert torch.equal(gen.window_input(gen.schedule[-1]).caption[:, -1], b[:, 0])
    for c in (0, 1):   # chunks before the switch never see the second prompt
        assert torch.equal(o1[c].latent, o2[c].latent)
    for c in (2, 3):
        assert not torch.allclose(o1[c].latent, o2[c].latent)


def test_kv_offload_gives_the_same_video(model):
    n = 3
    cond = Conditioning(*captions(model, n))
    g1, o1 = run(model, sampler(cfg_number=3, noise2clean_kvrange=[3, 2]), cond, n)
    g2, o2 = run(model, sampler(cfg_number=3, noise2clean_kvrange=[3, 2], kv_offload=True), cond, n)
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(o1, o2))
    st = g2.cache.stats()
    assert st["offload"] and st["bytes_written"] > 0 and st["bytes_read"] > 0 and st["stored_bytes"] == 0
