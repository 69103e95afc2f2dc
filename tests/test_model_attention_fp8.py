"""model.attention_backend=cudnn_fp8: config path and its one-line errors, the fp8 scale rules (CPU), and on a
Hopper GPU with NVIDIA's cuDNN frontend installed, forward and backward against bf16 per-chunk SDPA."""
import importlib.util

import pytest
import torch

from magi_train.config import ConfigError, model_preset
from magi_train.model import ChunkLayout, chunk_causal_attention
from magi_train.model import attention_fp8 as fp8

HAS_CUDNN_FE = importlib.util.find_spec("cudnn") is not None
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
gpu = pytest.mark.skipif(not (HOPPER and HAS_CUDNN_FE), reason="needs a Hopper GPU and nvidia-cudnn-frontend")

# e4m3 rounds P, V and O (each ~3.6 % relative): on random inputs, whose O averages V rows of random sign, that
# is ~6 % relative (norm) error in O; measured 0.060 at the 4.5B training shape on an H200 (docs/benchmarks.md)
FWD_TOL, BWD_TOL = 0.08, 0.08


def test_config_accepts_cudnn_fp8_and_names_it_when_wrong():
    assert model_preset("4.5B", attention_backend="cudnn_fp8").attention_backend == "cudnn_fp8"
    with pytest.raises(ConfigError, match="model.attention_backend.*cudnn_fp8"):
        model_preset("tiny", attention_backend="fp8")


def test_cpu_request_is_one_line_error():
    q, k, v = torch.randn(1, 2, 8, 128), torch.randn(1, 1, 8, 128), torch.randn(1, 1, 8, 128)
    with pytest.raises(ValueError) as e:
        chunk_causal_attention(q, k, v, ChunkLayout.causal(2, 4), "cudnn_fp8")
    msg = str(e.value)
    assert "needs a CUDA GPU" in msg and "sdpa_chunked" in msg and len(msg.splitlines()) == 1


def test_head_dim_other_than_128_is_refused_up_front():
    with pytest.raises(ValueError, match="head dim 128"):
        fp8.require_cudnn_fp8("cpu", head_dim=32)


@pytest.mark.skipif(HAS_CUDNN_FE, reason="the package is installed")
def test_missing_package_names_the_extra():
    fp8._cudnn.cache_clear()
    with pytest.raises(ValueError, match=r"pip install 'magi\[cudnn\]'"):
        fp8._cudnn()


def test_training_entry_point_refuses_cpu_in_one_line(tmp_path, capsys, monkeypatch):
    from magi_train.train import main

    monkeypatch.setenv("WANDB_MODE", "disabled")
    code = main(["model=4.5B", "model.num_layers=1", "model.attention_backend=cudnn_fp8", "train.device=cpu",
                 f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cudnn_fp8" in err[0] and "CUDA GPU" in err[0], err


def test_fp8_format_takes_fp8_attention_by_default_where_it_runs():
    from magi_infer.config import load_infer_config
    from magi_infer.runner import attention_backend

    cfg = load_infer_config("configs/infer/24B_distill_quant.json")
    assert cfg.fp8_quant and cfg.model.attention_backend == "auto"
    assert attention_backend(cfg, torch.device("cpu")) == "sdpa_chunked"
    on_gpu = "cudnn_fp8" if HOPPER and HAS_CUDNN_FE else "sdpa_chunked"
    assert attention_backend(cfg, torch.device("cuda")) == on_gpu
    off = load_infer_config("configs/infer/24B_distill_quant.json", ["model.attention_backend=sdpa_chunked"])
    assert attention_backend(off, torch.device("cuda")) == "sdpa_chunked"
    bf16 = load_infer_config("configs/infer/4.5B_distill.json")
    assert attention_backend(bf16, torch.device("cuda")) == "sdpa_chunked"


def test_current_scale_spans_e4m3_and_quantisation_is_within_half_an_ulp():
    x = torch.randn(3, 4, 50, 16) * 7
    scale, descale = fp8.current_scale(x)
    x8 = fp8.quantize(x, scale)
    assert x8.dtype == torch.float8_e4m3fn and float(x8.float().abs().max()) == 448.0
    back = fp8.dequantize(x8, descale, torch.float32)
    normal = x.abs() * scale.reshape(()) >= 2 ** -6          # e4m3's normal range: 3 mantissa bits
    assert ((back - x).abs()[normal] <= x.abs()[normal] * 2 ** -4 + 1e-6).all()


def test_output_scale_bounds_o_for_any_softmax():
    """|O| <= amax(V) for O = P V with P's rows in [0, 1] summing to ~1 (e4m3-rounded at scale 448), so the
    O scale derived from V's keeps O inside e4m3 with the headroom."""
    g = torch.Generator().manual_seed(1)
    v = torch.randn(1, 2, 300, 16, generator=g)
    v[0, 0, 7] = 40.0                                           # one large value row: the tight case
    logits = torch.randn(1, 2, 64, 300, generator=g) * 30      # nearly one-hot rows
    p = torch.softmax(logits, dim=-1)
    p8 = fp8.quantize(p, torch.tensor(448.0)).float() / 448
    sv, dsv = fp8.current_scale(v)
    o = p8 @ fp8.dequantize(fp8.quantize(v, sv), dsv, torch.float32)
    so, dso = fp8.output_scale(sv)
    assert float((o * so.reshape(())).abs().max()) <= 448 * fp8.O_HEADROOM * 1.07   # P rows sum <= 1 + 1/16
    assert torch.allclose(so * dso, torch.ones(()))


def _case(device, requires_grad=False, n=3, cached=1, T=256, Hq=6, Hkv=2):
    g = torch.Generator(device=device).manual_seed(0)
    S, Sk = n * T, (n + cached) * T
    # [S, B, H, D] memory permuted to [B, H, S, D], as the model hands them over
    q = torch.randn(S, 1, Hq, 128, device=device, generator=g).to(torch.bfloat16).permute(1, 2, 0, 3)
    k = (torch.randn(Sk, 1, Hkv, 128, device=device, generator=g) * 2).to(torch.bfloat16).permute(1, 2, 0, 3)
    v = torch.randn(Sk, 1, Hkv, 128, device=device, generator=g).to(torch.bfloat16).permute(1, 2, 0, 3)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    layout = ChunkLayout.causal(n, T, first_chunk=cached, cached_chunks=tuple(range(cached)))
    return q, k, v, layout


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@gpu
def test_forward_matches_bf16_sdpa():
    q, k, v, layout = _case("cuda")
    with torch.no_grad():
        ref = chunk_causal_attention(q, k, v, layout, "sdpa_chunked")
        out = chunk_causal_attention(q, k, v, layout, "cudnn_fp8")
    assert out.dtype == q.dtype and out.stride() == q.stride() and torch.isfinite(out).all()
    assert _rel(out, ref) < FWD_TOL


@gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_output_dequantised_into_the_buffer_is_the_ops_output(compiled):
    """Outside autograd O is dequantised straight into linear_proj's buffer (a strided half of [S, B, 2, H, D]):
    every element written, the custom op's bits."""
    from magi_train.model import fused_ops

    q, k, v, layout = _case("cuda")
    S, B, H, D = q.shape[2], q.shape[0], q.shape[1], q.shape[3]
    buf = torch.full((S, B, 2, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    fused_ops.use_compiled(compiled)
    try:
        with torch.no_grad():
            want = chunk_causal_attention(q, k, v, layout, "cudnn_fp8")
            got = chunk_causal_attention(q, k, v, layout, "cudnn_fp8", out=buf[:, :, 0].permute(1, 2, 0, 3))
    finally:
        fused_ops.use_compiled(False)
    assert got.data_ptr() == buf.data_ptr() and torch.isnan(buf[:, :, 1]).all()
    assert torch.equal(buf[:, :, 0].permute(1, 2, 0, 3), want)


@gpu
def test_backward_matches_bf16_sdpa():
    q, k, v, layout = _case("cuda", requires_grad=True)
    w = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    res = []
    for backend in ("sdpa_chunked", "cudnn_fp8"):
        out = chunk_causal_attention(q, k, v, layout, backend)
        res.append([out, *torch.autograd.grad((out.float() * w).sum(), (q, k, v))])
    for name, ref, got in zip(("out", "dq", "dk", "dv"), *res):
        assert torch.isfinite(got).all(), name
        assert _rel(got, ref) < (FWD_TOL if name == "out" else BWD_TOL), name


@gpu
def test_custom_ops_pass_opcheck_and_compile():
    q, k, v, layout = _case("cuda", requires_grad=True, n=2, cached=0)
    bounds = [b for sl in layout.kv_slices() for b in sl]
    torch.library.opcheck(torch.ops.magi.cudnn_fp8_attention.default, (q, k, v, layout.tokens_per_chunk, bounds, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    f = torch.compile(lambda a, b, c: chunk_causal_attention(a, b, c, layout, "cudnn_fp8"), fullgraph=True)
    out = f(q, k, v)
    dq, = torch.autograd.grad(out.float().sum(), (q,))
    ref = chunk_causal_attention(q, k, v, layout, "cudnn_fp8")
    dq_ref, = torch.autograd.grad(ref.float().sum(), (q,))
    assert _rel(out, ref) < 1e-3 and _rel(dq, dq_ref) < 1e-2   # the same kernels (dQ may accumulate unordered)


def test_selective_recompute_keeps_the_fp8_attention_output():
    from magi_train.parallel.recompute import attention_ops

    assert torch.ops.magi.cudnn_fp8_attention.default in attention_ops()
