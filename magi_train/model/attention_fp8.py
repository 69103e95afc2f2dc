"""fp8 chunk-causal self-attention on Hopper through NVIDIA's cuDNN frontend (model.attention_backend=cudnn_fp8).

Same calls as sdpa_chunked (attention.py): one unmasked attention per query chunk over its contiguous key slice,
here one cuDNN `sdpa_fp8` graph each (built once per shape and stride, cached). GQA stays grouped: cuDNN takes
Hkv < Hq itself, so nothing is folded or repeated.

Scaling is per tensor and current (no history), e4m3 everywhere:
  q, k, v   amax of the whole call's tensor (all chunks, cached K/V included) -> scale 448 / amax
  S = P     the softmax probabilities lie in [0, 1]: scale 448, fixed
  O         a row of O is a convex combination of V rows, so |O| <= amax(V): scale O_HEADROOM * 448 / amax(V)
            (the headroom covers P's rounding, whose rows may sum a little over 1)
The output comes back in q's dtype (bf16) and q's memory layout, for the next linear.

cuDNN 9.19 on Hopper gives O (and dQ, dK, dV) only in fp8 (bf16 outputs are Blackwell-only), so O is dequantised
here. Backward (training): cuDNN's bf16 `sdpa_backward` per chunk from the fp8 forward's softmax stats, with the
bf16 q, k, v, O and dO: exact bf16 arithmetic around the fp8 forward's statistics. Why not `sdpa_fp8_backward`: on
Hopper its dQ/dK/dV are fp8 too, which needs scales for them and for dP known before the call (delayed scaling
with per-layer history), and measured at the training shape it gains little over bf16 (docs/benchmarks.md, fp8
attention: 11 % faster kernel, 9-17x the gradient error). The forward and backward are torch custom ops: opaque
to torch.compile, and the forward is one op that selective recompute keeps (parallel/recompute.attention_ops).

Needs: a CUDA GPU of compute capability >= 9.0, head dim 128 (cuDNN's fp8 SDPA) and the nvidia-cudnn-frontend
package (pip install 'magi[cudnn]'), imported on first use."""
from __future__ import annotations

import functools
import math

import torch

from . import fused_ops

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
O_HEADROOM = 0.5

# uids of the graphs' tensors
_Q, _K, _V, _O, _STATS, _DQ, _DK, _DV, _DS_Q, _DS_K, _DS_V, _DS_S, _SC_S, _SC_O, _AMAX_S, _AMAX_O, _DO = range(1, 18)


def require_cudnn_fp8(device: torch.device | str, head_dim: int = 128) -> None:
    """Raise a one-line ValueError unless model.attention_backend='cudnn_fp8' can run on `device`."""
    if head_dim != 128:
        raise ValueError(f"model.attention_backend='cudnn_fp8': cuDNN's fp8 attention on Hopper needs head dim 128 "
                         f"(model.kv_channels), got {head_dim}; use 'sdpa_chunked'")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"model.attention_backend='cudnn_fp8' needs a CUDA GPU of compute capability >= 9.0 "
                           f"(Hopper), got device {device.type}; use 'sdpa_chunked'")
    cc = torch.cuda.get_device_capability(device)
    if cc[0] < 9:
        raise ValueError(f"model.attention_backend='cudnn_fp8' needs compute capability >= 9.0 (Hopper), "
                           f"{torch.cuda.get_device_name(device)} is {cc[0]}.{cc[1]}; use 'sdpa_chunked'")
    _cudnn()


@functools.lru_cache(maxsize=1)
def _cudnn():
    try:
        import cudnn
    except ImportError as e:  # optional extra
        raise ValueError("model.attention_backend='cudnn_fp8' needs NVIDIA's cuDNN frontend "
                           "(pip install 'magi[cudnn]'); use 'sdpa_chunked' without it") from e
    return cudnn


@functools.lru_cache(maxsize=8)
def _handle(device_index: int):
    return _cudnn().create_handle()


def _on_stream(device: torch.device):
    cudnn = _cudnn()
    h = _handle(device.index if device.index is not None else torch.cuda.current_device())
    cudnn.set_stream(h, torch.cuda.current_stream(device).cuda_stream)
    return h


# ---------------------------------------------------------------- scales (plain torch; tested on CPU)

def current_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) [1, 1, 1, 1] fp32 of per-tensor current scaling: x * scale spans e4m3's +-448."""
    amax = torch.linalg.vector_norm(x.detach(), float("inf"), dtype=torch.float32).clamp_min(1e-12)  # one pass
    scale = (E4M3_MAX / amax).reshape(1, 1, 1, 1)
    return scale, scale.reciprocal()


def output_scale(v_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale) for O from V's scale: |O| <= amax(V), kept O_HEADROOM under e4m3's maximum."""
    scale = v_scale * O_HEADROOM
    return scale, scale.reciprocal()


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * scale rounded to e4m3 (saturated), in x's memory layout."""
    return (x.float() * scale.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(x8: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x8.float() * descale.reshape(())).to(dtype)


@functools.lru_cache(maxsize=1)
def _compiled():
    # one fused kernel each instead of 3-4 passes over an fp32 copy (q of 37,440 tokens is 115M elements)
    return (torch.compile(quantize, dynamic=True), torch.compile(dequantize, dynamic=True))


def _quantize(x, scale):
    return _compiled()[0](x, scale) if x.is_cuda else quantize(x, scale)


def _dequantize(x8, descale, dtype):
    return _compiled()[1](x8, descale, dtype) if x8.is_cuda else dequantize(x8, descale, dtype)


# ---------------------------------------------------------------- cuDNN graphs

def _dtype(torch_dtype):
    dt = _cudnn().data_type
    return {E4M3: dt.FP8_E4M3, torch.bfloat16: dt.BFLOAT16, torch.float16: dt.HALF, torch.float32: dt.FLOAT}[torch_dtype]


def _build(graph):
    cudnn = _cudnn()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph, graph.get_workspace_size()


def _scalar(g, uid):
    return g.tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=_cudnn().data_type.FLOAT, uid=uid)


@functools.lru_cache(maxsize=256)
def _forward_graph(q_shape, k_shape, q_stride, k_stride, v_stride, o_stride, stats: bool, device_index: int):
    """One chunk's sdpa_fp8: e4m3 q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> e4m3 O (+ the chunk's fp32 softmax
    stats, packed [B, Hq, Sq, 1]: the bf16 backward of cuDNN 9.19 reads them only packed, when stats)."""
    cudnn = _cudnn()
    f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    B, Hq, Sq, D = q_shape
    g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32,
                      handle=_handle(device_index))
    q = g.tensor(dim=list(q_shape), stride=list(q_stride), data_type=f8, uid=_Q)
    k = g.tensor(dim=list(k_shape), stride=list(k_stride), data_type=f8, uid=_K)
    v = g.tensor(dim=list(k_shape), stride=list(v_stride), data_type=f8, uid=_V)
    o, st, amax_s, amax_o = g.sdpa_fp8(
        q=q, k=k, v=v, descale_q=_scalar(g, _DS_Q), descale_k=_scalar(g, _DS_K), descale_v=_scalar(g, _DS_V),
        descale_s=_scalar(g, _DS_S), scale_s=_scalar(g, _SC_S), scale_o=_scalar(g, _SC_O),
        generate_stats=stats, attn_scale=1.0 / math.sqrt(D), use_causal_mask=False)
    o.set_uid(_O).set_output(True).set_dim(list(q_shape)).set_stride(list(o_stride)).set_data_type(f8)
    if stats:
        st.set_uid(_STATS).set_output(True).set_dim([B, Hq, Sq, 1]).set_stride([Hq * Sq, Sq, 1, 1]).set_data_type(f32)
    for t, uid in ((amax_s, _AMAX_S), (amax_o, _AMAX_O)):
        t.set_uid(uid).set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    return _build(g)


@functools.lru_cache(maxsize=256)
def _backward_graph(q_shape, k_shape, strides: tuple, dtype: torch.dtype, device_index: int):
    """One chunk's bf16 sdpa_backward from the forward's softmax stats: (q, k, v, o, dO) -> (dQ, dK, dV).
    strides: those of q, k, v, o, dO, dQ, dK, dV (dK/dV of their own chunk buffers)."""
    cudnn = _cudnn()
    io, f32 = _dtype(dtype), cudnn.data_type.FLOAT
    B, Hq, Sq, D = q_shape
    qs, ks, vs, os_, dos, dqs, dks, dvs = (list(s) for s in strides)
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                      handle=_handle(device_index))
    q = g.tensor(dim=list(q_shape), stride=qs, data_type=io, uid=_Q)
    k = g.tensor(dim=list(k_shape), stride=ks, data_type=io, uid=_K)
    v = g.tensor(dim=list(k_shape), stride=vs, data_type=io, uid=_V)
    o = g.tensor(dim=list(q_shape), stride=os_, data_type=io, uid=_O)
    do = g.tensor(dim=list(q_shape), stride=dos, data_type=io, uid=_DO)
    st = g.tensor(dim=[B, Hq, Sq, 1], stride=[Hq * Sq, Sq, 1, 1], data_type=f32, uid=_STATS)
    dq, dk, dv = g.sdpa_backward(q=q, k=k, v=v, o=o, dO=do, stats=st, attn_scale=1.0 / math.sqrt(D),
                                 use_causal_mask=False)
    dq.set_uid(_DQ).set_output(True).set_dim(list(q_shape)).set_stride(dqs).set_data_type(io)
    dk.set_uid(_DK).set_output(True).set_dim(list(k_shape)).set_stride(dks).set_data_type(io)
    dv.set_uid(_DV).set_output(True).set_dim(list(k_shape)).set_stride(dvs).set_data_type(io)
    return _build(g)


def _run(graph_ws, pack: dict, device: torch.device):
    graph, ws = graph_ws
    workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=_on_stream(device))


def _chunks(chunk_tokens: int, kv_bounds: list[int]):
    return [(i * chunk_tokens, (i + 1) * chunk_tokens, kv_bounds[2 * i], kv_bounds[2 * i + 1])
            for i in range(len(kv_bounds) // 2)]


def _check_shapes(q, k):
    if q.shape[1] % k.shape[1]:
        raise RuntimeError(f"cudnn_fp8: query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")


def _dev_index(x):
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def forward_impl(q, k, v, chunk_tokens: int, kv_bounds: list[int], stats: bool, out: torch.Tensor | None = None):
    """(out [q's dtype and layout], softmax stats [chunks, B, Hq, chunk_tokens, 1] fp32, or empty). Given `out`
    (inference: a view of the buffer linear_proj reads), O is dequantised straight into it."""
    require_cudnn_fp8(q.device, q.shape[-1])
    _check_shapes(q, k)
    sq, dsq = current_scale(q)
    sk, dsk = current_scale(k)
    sv, dsv = current_scale(v)
    so, dso = output_scale(sv)
    q8, k8, v8 = _quantize(q, sq), _quantize(k, sk), _quantize(v, sv)
    o8 = torch.empty_like(q8)
    B, Hq, S, D = q.shape
    n = len(kv_bounds) // 2
    st = (torch.empty(n, B, Hq, chunk_tokens, 1, dtype=torch.float32, device=q.device) if stats
          else q.new_empty(0, dtype=torch.float32))
    s_scale = torch.full((1, 1, 1, 1), E4M3_MAX, dtype=torch.float32, device=q.device)
    s_descale = s_scale.reciprocal()
    amax = torch.empty(2, 1, 1, 1, dtype=torch.float32, device=q.device)
    dev = _dev_index(q)
    for i, (q0, q1, k0, k1) in enumerate(_chunks(chunk_tokens, kv_bounds)):
        qi, ki, vi, oi = q8[:, :, q0:q1], k8[:, :, k0:k1], v8[:, :, k0:k1], o8[:, :, q0:q1]
        g = _forward_graph(tuple(qi.shape), tuple(ki.shape), qi.stride(), ki.stride(), vi.stride(), oi.stride(),
                           stats, dev)
        pack = {_Q: qi, _K: ki, _V: vi, _O: oi, _DS_Q: dsq, _DS_K: dsk, _DS_V: dsv, _DS_S: s_descale,
                _SC_S: s_scale, _SC_O: so, _AMAX_S: amax[0:1], _AMAX_O: amax[1:2]}
        if stats:
            pack[_STATS] = st[i]
        _run(g, pack, q.device)
    if out is not None:
        return fused_ops.dequantize_into(out, o8, dso), st
    out = _dequantize(o8, dso, q.dtype)
    if out.stride() != q.stride():  # the op's declared layout is q's (register_fake below)
        out = torch.empty_like(q).copy_(out)
    return out, st


def backward_impl(dout, q, k, v, out, st, chunk_tokens: int, kv_bounds: list[int]):
    """(dq, dk, dv) in the layouts of q, k, v."""
    if dout.stride() != out.stride():  # dO in O's layout (one graph per layout, as for O)
        dout = torch.empty_like(out).copy_(dout)
    dq = torch.empty_like(q)
    dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    dev = _dev_index(q)
    for i, (q0, q1, k0, k1) in enumerate(_chunks(chunk_tokens, kv_bounds)):
        qi, oi, doi, dqi = (x[:, :, q0:q1] for x in (q, out, dout, dq))
        ki, vi = k[:, :, k0:k1], v[:, :, k0:k1]
        dki = torch.empty(ki.shape, dtype=k.dtype, device=k.device)
        dvi = torch.empty(vi.shape, dtype=v.dtype, device=v.device)
        strides = tuple(x.stride() for x in (qi, ki, vi, oi, doi, dqi, dki, dvi))
        g = _backward_graph(tuple(qi.shape), tuple(ki.shape), strides, q.dtype, dev)
        _run(g, {_Q: qi, _K: ki, _V: vi, _O: oi, _DO: doi, _STATS: st[i], _DQ: dqi, _DK: dki, _DV: dvi}, q.device)
        dk_acc[:, :, k0:k1] += dki
        dv_acc[:, :, k0:k1] += dvi
    return dq, torch.empty_like(k).copy_(dk_acc), torch.empty_like(v).copy_(dv_acc)


# ---------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("magi::cudnn_fp8_attention", mutates_args=())
def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int, kv_bounds: list[int],
                        stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(q, k, v, chunk_tokens, kv_bounds, stats)


@cudnn_fp8_attention.register_fake
def _(q, k, v, chunk_tokens, kv_bounds, stats):
    B, H = q.shape[:2]
    shape = (len(kv_bounds) // 2, B, H, chunk_tokens, 1) if stats else (0,)
    return torch.empty_like(q), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("magi::cudnn_fp8_attention_backward", mutates_args=())
def cudnn_fp8_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, st: torch.Tensor, chunk_tokens: int,
                                 kv_bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(dout, q, k, v, out, st, chunk_tokens, kv_bounds)


@cudnn_fp8_attention_backward.register_fake
def _(dout, q, k, v, out, st, chunk_tokens, kv_bounds):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, chunk_tokens, kv_bounds, stats = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.chunking = (chunk_tokens, kv_bounds, stats)


def _backward(ctx, dout, dstats):
    chunk_tokens, kv_bounds, stats = ctx.chunking
    if not stats:
        raise RuntimeError("cudnn_fp8 attention: backward through a forward run without grad (no softmax stats)")
    q, k, v, out, st = ctx.saved_tensors
    dq, dk, dv = cudnn_fp8_attention_backward(dout, q, k, v, out, st, chunk_tokens, kv_bounds)
    return dq, dk, dv, None, None, None


cudnn_fp8_attention.register_autograd(_backward, setup_context=_setup_context)


def chunk_attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """attention.py's backend 'cudnn_fp8': q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] -> [B, Hq, Sq, D] in q's dtype,
    written into `out` when given (outside autograd the dequantisation writes there: no copy of O)."""
    bounds = []
    for sl in layout.kv_slices():
        if sl is None:
            raise RuntimeError("model.attention_backend='cudnn_fp8' needs contiguous key chunks per query chunk; "
                               "use 'sdpa_chunked' for this layout")
        bounds += [sl[0], sl[1]]
    stats = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if out is not None and not stats and not out.requires_grad:
        return forward_impl(q, k, v, layout.tokens_per_chunk, bounds, False, out)[0]
    result = cudnn_fp8_attention(q, k, v, layout.tokens_per_chunk, bounds, stats)[0]
    return result if out is None else out.copy_(result)
