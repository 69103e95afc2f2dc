"""The fast path as the default: the auto attention backend, the compiled fp32 islands, CFG passes only where they
weigh, the release's NEG_PROMPT null caption and the fp8 weight format on any device (all on the CPU)."""
import numpy as np
import pytest
import torch
from conftest import random_captions, randomize_, tiny_infer_dit

from magi_infer.conditioning import NEGATIVE_SPECIAL_TOKENS, Conditioning
from magi_infer.config import SamplerConfig, load_infer_config
from magi_infer.guidance import _alone, guided_velocity
from magi_infer.pipeline import ChunkGenerator
from magi_infer.runner import MagiRunner, describe_run
from magi_train.config import ConfigError, model_preset
from magi_train.diffusion.sampling import cfg_scales, combine_cfg
from magi_train.model import build_dit, fused_ops
from magi_train.model.attention import resolve_backend
from magi_train.precision.magi_fp8 import quantize_weight

CW, HW = 2, (4, 4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_infer_dit(CW)


captions = random_captions


@pytest.mark.parametrize("name, dtype, layout", [("4.5B_base", "bfloat16", "tp1 cp1 pp1"),
                                                  ("4.5B_distill", "bfloat16", "tp1 cp1 pp1"),
                                                  ("24B_distill_quant", "bfloat16 with MAGI-1 fp8 linears", "tp1 cp4 pp1")])
def test_magi1_example_json_runs_the_fast_backend_on_cuda(name, dtype, layout):
    cfg = load_infer_config(f"configs/infer/{name}.json")
    assert cfg.model.attention_backend == "auto"  # the release's json names none
    assert resolve_backend(cfg.model.attention_backend, "cuda") == "sdpa_chunked"
    # the MAGI-1 fp8 format takes fp8 attention where cuDNN's can run (Hopper + the package), else sdpa_chunked
    expected = "cudnn_fp8" if cfg.fp8_quant and _cudnn_fp8_runs() else "sdpa_chunked"
    assert describe_run(cfg, torch.device("cuda"), torch.bfloat16) == (
        f"magi_infer: attention {expected}, dtype {dtype}, device cuda, layout {layout}, compile on")


def _cudnn_fp8_runs() -> bool:
    from magi_train.model.attention_fp8 import require_cudnn_fp8

    try:
        require_cudnn_fp8("cuda", 128)
        return True
    except ValueError:
        return False


def test_reference_only_when_asked():
    assert resolve_backend("auto", "cpu") == "sdpa_chunked"
    assert resolve_backend("reference", "cuda") == "reference"
    cfg = load_infer_config("configs/infer/4.5B_base.json", ["model.attention_backend=reference"])
    assert resolve_backend(cfg.model.attention_backend, "cuda") == "reference"
    with pytest.raises(ConfigError, match="model.attention_backend"):
        load_infer_config("configs/infer/4.5B_base.json", ["model.attention_backend=fastest"])


def test_compiled_islands_match_the_plain_ops(model):
    """torch.compile'd norms/RoPE/gated residuals (inductor, CPU) against the eager ops, two window shapes."""
    g = torch.Generator().manual_seed(2)
    inputs = [(torch.randn(1, 16, 2 * CW, *HW, generator=g), torch.tensor([[0.7, 0.2]]), captions(model, 2)[0]),
              (torch.randn(2, 16, 3 * CW, *HW, generator=g), torch.rand(2, 3, generator=g),
               captions(model, 3)[0].expand(2, -1, -1, -1))]
    with torch.no_grad():
        plain = [model(x, t, c) for x, t, c in inputs]
        try:
            fused_ops.use_compiled(True)
            fused = [model(x, t, c) for x, t, c in inputs]
        finally:
            fused_ops.use_compiled(False)
    for a, b in zip(plain, fused):
        assert a.abs().max() > 0.1
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_uncond_pass_runs_only_where_it_weighs(model):
    """cfg 3: the chunk-alone pass for the chunks with 1 - s_prev != 0 only; the sum equals the all-chunk one."""
    n = 4
    s = SamplerConfig(num_steps=8, window_size=4, cfg_number=3, noise2clean_kvrange=[], clean_chunk_kvrange=1)
    gen = ChunkGenerator(model, s, Conditioning(*captions(model, n)), n, HW, seed=0)
    for i in range(len(gen.schedule)):
        ws = gen.schedule[i]
        if len(ws.chunks) == 4:
            break
        gen.step(i)
    inp = gen.window_input(ws)
    s_prev, s_text = cfg_scales(inp.t[0, inp.num_clean:], s.cfg_t_range, s.prev_chunk_scales, s.text_scales)
    assert (s_prev == 1).any() and (s_prev != 1).any()  # some chunks weigh, some do not

    forwards = []
    hook = model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        v = guided_velocity(model, inp, None, s)
    finally:
        hook.remove()
    assert forwards[-1] == int((s_prev != 1).sum())  # rows of the alone pass

    # the plain sum: every pass over every chunk
    B, nc = 1, inp.num_clean
    null, null_mask = model.null_caption(B, inp.t.shape[1], inp.caption.shape[2])
    kept = torch.zeros(B, dtype=torch.bool)
    with torch.no_grad():
        v_text = model(inp.x, inp.t, inp.caption, inp.caption_mask, kept, chunk_offset=inp.first_chunk,
                       lookback=inp.lookback)[:, :, nc * CW:]
        v_ctx = model(inp.x, inp.t, null, null_mask, ~kept, chunk_offset=inp.first_chunk,
                      lookback=inp.lookback)[:, :, nc * CW:]
        v_unc = _alone(model, inp.x[:, :, nc * CW:], inp.t[:, nc:], null[:, nc:], null_mask[:, nc:], ~kept, None, CW)
    torch.testing.assert_close(v, combine_cfg(v_text, v_ctx, v_unc, s_prev, s_text, CW), rtol=1e-4, atol=1e-5)


def _token_file(tmp_path, dim):
    rng = np.random.default_rng(0)
    path = tmp_path / "special_tokens.npz"
    np.savez(path, caption_token=rng.standard_normal((1, dim)), logo_token=rng.standard_normal((1, dim)),
             other_tokens=rng.standard_normal((20, dim)))
    return path


def test_neg_prompt_puts_the_release_tokens_before_the_null_caption(tmp_path, monkeypatch):
    cfg = load_infer_config("configs/infer/tiny.yaml", ["video_size_h=32", "video_size_w=32", "num_frames=16",
                                                        "num_steps=4", "window_size=2", "noise2clean_kvrange=[2,1]",
                                                        f"special_tokens_path={_token_file(tmp_path, 64)}"])
    monkeypatch.setenv("NEG_PROMPT", "1")
    runner = MagiRunner(cfg)
    cond, _ = runner.conditioning("t2v", ["a red ball"])
    data = np.load(cfg.special_tokens_path)
    rows = {"CAPTION_TOKEN": data["caption_token"][0], "LOGO_TOKEN": data["logo_token"][0],
            "TRANS_TOKEN": data["other_tokens"][0], "BORDERNESS_TOKEN": data["other_tokens"][4]}
    # each token goes in front of the previous ones: BORDERNESS, TRANS, LOGO, CAPTION, then the null caption
    want = torch.tensor(np.stack([rows[k] for k in reversed(NEGATIVE_SPECIAL_TOKENS)]), dtype=torch.float16).float()
    torch.testing.assert_close(cond.null_prefix, want, rtol=0, atol=0)

    dit = runner.model
    gen = runner.generator("t2v", ["a red ball"])
    L = gen.caption.shape[2]
    emb, mask = dit.null_caption(1, 1, L)
    torch.testing.assert_close(emb[0, 0, :4], want)
    torch.testing.assert_close(emb[0, 0, 4:], dit.y_embedder.null_caption_embedding[:L - 4])
    n_null = min(dit.cfg.null_caption_tokens, L)  # the mask stays the release's first 50 tokens
    assert mask[0, 0].sum() == n_null and mask[0, 0, :n_null].all()
    # a dropped chunk (the forward's null-prompt rows) sees the same padded null caption
    cap, cmask = dit._captions(gen.caption[:, :1], gen.caption_mask[:, :1], torch.ones(1, 1, dtype=torch.bool), 1)
    torch.testing.assert_close(cap, emb.to(cap))
    list(gen)  # runs end to end
    monkeypatch.delenv("NEG_PROMPT")
    runner.generator("t2v", ["a red ball"])
    assert dit.null_caption_prefix is None  # off again for the next video


def test_quantize_weight_keeps_the_weight_device():
    """Every tensor of the fp8 format is made where the weight lives (meta stands in for CUDA here)."""
    w = torch.randn(8, 16, device="meta")
    for kind, amax in (("per_tensor", None), ("per_channel", None), ("per_channel", torch.rand(16, device="meta"))):
        out = quantize_weight(w, kind, act_amax=amax)
        assert all(v.device.type == "meta" for v in out.values()), kind


def test_fused_fp8_input_quantisation_is_the_plain_rule():
    """The compiled kernel Fp8Linear uses on CUDA gives the same e4m3 bits as the plain ops (inductor on CPU)."""
    from magi_train.precision.magi_fp8 import _fused_to_e4m3, _to_e4m3

    g = torch.Generator().manual_seed(0)
    for rows in (37, 100):  # odd row counts: no padding to 16 any more
        x = (torch.randn(rows, 64, generator=g) * 300).to(torch.bfloat16)   # beyond e4m3's range: clamped
        divisor = torch.rand(64, generator=g) + 0.5
        assert torch.equal(_fused_to_e4m3()(x, divisor).view(torch.uint8), _to_e4m3(x, divisor).view(torch.uint8))


def test_cross_attention_sees_only_the_caption_keys_any_pass_uses():
    """Captions are cut after the last valid token (and the null caption's first tokens): same velocity."""
    import dataclasses

    m = randomize_(build_dit(model_preset("tiny", chunk_width=CW, caption_max_length=32, null_caption_tokens=8)),
                   std=0.1, seed=4).eval()
    emb, mask = captions(m, 2)
    mask[..., 5:] = False
    s = SamplerConfig(num_steps=4, window_size=2, cfg_number=3, noise2clean_kvrange=[2, 1])
    gen = ChunkGenerator(m, s, Conditioning(emb, mask), 2, HW, seed=0)
    assert gen.caption.shape[2] == 8  # max(5 valid, 8 null tokens) of 32
    inp = gen.window_input(gen.schedule[0])
    full = dataclasses.replace(inp, caption=emb[:, :1], caption_mask=mask[:, :1])
    torch.testing.assert_close(guided_velocity(m, inp, None, s), guided_velocity(m, full, None, s),
                               rtol=1e-4, atol=2e-5)  # fp32 sums of other lengths, times CFG scale 7.5


@pytest.mark.parametrize("override, message", [("i2v_frame0=bogus", "i2v_frame0: got 'bogus', accepted values"),
                                               ("compile=maybe", "compile: expected true or false"),
                                               ("negative_special_tokens=3", "negative_special_tokens: expected a list")])
def test_new_keys_reject_bad_values_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_infer_config("configs/infer/4.5B_distill.json", [override])


def test_compiled_islands_serve_every_window_length_with_one_kernel():
    """The fp32 islands compile once per feature width, not once per number of tokens (the window grows, drains
    and re-runs chunks alone): the token dim is dynamic, the normalised width fixed."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    try:
        fused_ops.use_compiled(True)
        before = counters["stats"]["unique_graphs"]
        for tokens in (12, 20, 36):
            x, res = (torch.randn(tokens, 1, 32, generator=g) for _ in range(2))
            gates = torch.randn(1, 3, 64, generator=g)[..., :32]  # the block's per-chunk view
            token_chunk = torch.arange(3).repeat_interleave(tokens // 3 + 1)[:tokens]
            y, normed = fused_ops.gated_residual(x, res, gates, token_chunk, w, b, 1e-6)
            assert normed is None  # the one-pass kernel is CUDA only
            torch.testing.assert_close(y, fused_ops._gated_residual(x, res, gates[:, token_chunk].transpose(0, 1),
                                                                    w, b, 1e-6), rtol=1e-5, atol=1e-5)
        assert counters["stats"]["unique_graphs"] - before == 1
    finally:
        fused_ops.use_compiled(False)


def test_fp8_q_qx_k_v_share_one_input_quantisation_only_when_their_scales_agree():
    """Fp8Linear.fused_forward quantises the input once for all four projections only if each would divide it by
    the same scales (weights-only scales: always); a calibrated checkpoint with other scales runs them apart."""
    from magi_train.precision.magi_fp8 import Fp8Linear

    g = torch.Generator().manual_seed(5)
    layers = []
    for out in (16, 16, 8, 8):
        m = Fp8Linear(32, out, "per_tensor")
        m.load_state_dict(quantize_weight(torch.randn(out, 32, generator=g), "per_tensor"))
        layers.append(m)
    assert Fp8Linear._share_input_rule(layers)
    with torch.no_grad():
        layers[2].input_scale.mul_(2.0)  # as a reload of calibrated scales would: re-checked, not cached
    assert not Fp8Linear._share_input_rule(layers)
    x = torch.randn(5, 32, generator=g)
    for got, m in zip(Fp8Linear.fused_forward(x, layers), layers):  # on the CPU: each linear on its own
        torch.testing.assert_close(got, m(x))
    # checked once per set of scales (the check waits for the GPU): a second call reuses it, per-channel too
    pc = [Fp8Linear(32, 8, "per_channel") for _ in range(2)]
    assert Fp8Linear._share_input_rule(pc)
    key = pc[0]._shared_rule[0]
    assert Fp8Linear._share_input_rule(pc) and pc[0]._shared_rule[0] == key
