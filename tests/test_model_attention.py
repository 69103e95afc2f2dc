"""Chunk-causal attention: every backend against the dense-mask reference; causality; cached windows."""
import pytest
import torch

from conftest import randomize_
from magi_train.config import model_preset
from magi_train.model import ChunkLayout, KVCache, build_dit, chunk_causal_attention

CPU_BACKENDS = ["sdpa_chunked"]
GPU = torch.cuda.is_available()


def _qkv(B=2, Hq=4, Hkv=2, n=3, T=5, D=16, n_cached=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, n * T, D, generator=g)
    k = torch.randn(B, Hkv, (n + n_cached) * T, D, generator=g)
    v = torch.randn(B, Hkv, (n + n_cached) * T, D, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lookback", [None, 2])
def test_backend_equals_reference_cpu(backend, lookback):
    q, k, v = _qkv(n=4, n_cached=2)
    layout = ChunkLayout.causal(4, 5, first_chunk=2, cached_chunks=(0, 1), lookback=lookback)
    ref = chunk_causal_attention(q, k, v, layout, "reference")
    out = chunk_causal_attention(q, k, v, layout, backend)
    assert (out - ref).abs().max() < 1e-5


def test_sdpa_chunked_grouped_heads_forward_and_backward_equal_reference():
    """sdpa_chunked serves grouped KV heads without repeating K/V; values and gradients are the reference's."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(Hq=6, Hkv=2, n=3, n_cached=1))
    layout = ChunkLayout.causal(3, 5, first_chunk=1, cached_chunks=(0,), lookback=2)
    w = torch.randn(q.shape)
    grads = []
    for backend in ("reference", "sdpa_chunked"):
        out = chunk_causal_attention(q, k, v, layout, backend)
        grads.append([out, *torch.autograd.grad((out * w).sum(), (q, k, v))])
    for ref, got in zip(*grads):
        assert (got - ref).abs().max() < 1e-5


def test_reference_mask_is_chunk_causal():
    layout = ChunkLayout.causal(3, 2, lookback=2)
    m = layout.chunk_mask()
    assert m.tolist() == [[True, False, False], [True, True, False], [False, True, True]]


def test_layout_rejects_blind_query():
    with pytest.raises(ValueError, match="sees no key chunk"):
        ChunkLayout(2, (0, 1), (0,), (0, 1), (0, 1))


def test_unknown_backend_is_named():
    q, k, v = _qkv(n=1)
    with pytest.raises(ValueError, match="model.attention_backend"):
        chunk_causal_attention(q, k, v, ChunkLayout.causal(1, 5), "nope")


def _tiny(backend="reference", **kw):
    torch.manual_seed(0)
    model = randomize_(build_dit(model_preset("tiny", attention_backend=backend, **kw)))
    return model.eval()


def _inputs(n=3, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, 6 * n, 4, 6, generator=g)
    t = torch.rand(B, n, generator=g)
    cap = torch.randn(B, n, 7, 64, generator=g)
    mask = torch.rand(B, n, 7, generator=g) > 0.3
    mask[:, :, 0] = True
    return x, t, cap, mask


@torch.no_grad()
@pytest.mark.parametrize("j", [1, 2])
def test_perturbing_chunk_j_changes_no_earlier_chunk(j):
    model = _tiny()
    x, t, cap, mask = _inputs()
    y = model(x, t, cap, mask)
    x2, t2, cap2 = x.clone(), t.clone(), cap.clone()
    x2[:, :, 6 * j:] += torch.randn_like(x2[:, :, 6 * j:])
    t2[:, j:] = 0.5
    cap2[:, j:] += 1.0
    y2 = model(x2, t2, cap2, mask)
    assert (y[:, :, : 6 * j] - y2[:, :, : 6 * j]).abs().max() == 0
    assert (y[:, :, 6 * j:] - y2[:, :, 6 * j:]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_model_backends_equal_reference(backend):
    ref = _tiny("reference")
    other = _tiny(backend)
    other.load_state_dict(ref.state_dict())
    x, t, cap, mask = _inputs()
    assert (ref(x, t, cap, mask) - other(x, t, cap, mask)).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("lookback", [None, 2])
def test_cached_window_equals_full_forward(lookback):
    model = _tiny()
    x, t, cap, mask = _inputs(n=4)
    full = model(x, t, cap, mask, lookback=lookback)
    cache = KVCache()
    # chunks 0,1 written (as MAGI-1's clean pass does), then the window [2, 3] against the cache
    model(x[:, :, :12], t[:, :2], cap[:, :2], mask[:, :2], kv_cache=cache, cache_write=True, lookback=lookback)
    window = model(x[:, :, 12:], t[:, 2:], cap[:, 2:], mask[:, 2:], chunk_offset=2, kv_cache=cache, lookback=lookback)
    assert (window - full[:, :, 12:]).abs().max() < 1e-5
    # one chunk at a time, each against the cache
    cache = KVCache(offload=True)
    for c in range(4):
        sl = slice(6 * c, 6 * c + 6)
        out = model(x[:, :, sl], t[:, c:c + 1], cap[:, c:c + 1], mask[:, c:c + 1], chunk_offset=c,
                    kv_cache=cache, cache_write=True, lookback=lookback)
        assert (out - full[:, :, sl]).abs().max() < 1e-5


@torch.no_grad()
def test_empty_caption_chunk_gets_zero_cross_attention():
    model = _tiny()
    x, t, cap, mask = _inputs(n=2)
    mask[:, 0] = False  # MAGI-1 feeds clean prefix chunks with an all-masked caption
    out = model(x, t, cap, mask)
    assert torch.isfinite(out).all()
    cap2 = cap.clone()
    cap2[:, 0] += 5
    assert (model(x, t, cap2, mask)[:, :, :6] - out[:, :, :6]).abs().max() == 0


@torch.no_grad()
def test_caption_dropped_uses_null_caption():
    model = _tiny()
    x, t, cap, mask = _inputs(n=2, B=2)
    dropped = torch.tensor([True, False])
    out = model(x, t, cap, mask, caption_dropped=dropped)
    emb, nmask = model.null_caption(2, 2, 7)
    ref = model(x, t, emb.clone(), nmask.clone(), caption_dropped=torch.tensor([True, True]))
    assert (out[0] - ref[0]).abs().max() < 1e-6
    assert (out[1] - model(x, t, cap, mask)[1]).abs().max() < 1e-6


@pytest.mark.skipif(not GPU, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa_chunked", "flex"])
def test_gpu_backends_bf16(backend):
    q, k, v = _qkv(B=1, Hq=8, Hkv=2, n=4, T=128, D=64, n_cached=1, dtype=torch.bfloat16, device="cuda")
    layout = ChunkLayout.causal(4, 128, first_chunk=1, cached_chunks=(0,), lookback=3)
    ref = chunk_causal_attention(q.float(), k.float(), v.float(), layout, "reference")
    out = chunk_causal_attention(q, k, v, layout, backend).float()
    assert (out - ref).abs().max() < 2e-2


@torch.no_grad()
def test_per_chunk_dropped_flags():
    """Clean context chunks can carry the null caption while later chunks keep theirs (training = inference cache)."""
    model = _tiny()
    x, t, cap, mask = _inputs(n=2, B=1)
    per_chunk = model(x, t, cap, mask, caption_dropped=torch.tensor([[True, False]]))
    all_dropped = model(x, t, cap, mask, caption_dropped=torch.tensor([True]))
    none_dropped = model(x, t, cap, mask)
    assert (per_chunk[:, :, :6] - all_dropped[:, :, :6]).abs().max() == 0        # chunk 0 sees only itself
    assert (per_chunk[:, :, 6:] - none_dropped[:, :, 6:]).abs().max() > 1e-4     # chunk 1 sees a null-caption chunk 0


def _cross_reference(q, k, v, mask):
    """Per sample and chunk, masked softmax attention of the chunk's queries over its caption keys in fp64; zero
    where the caption has no valid key."""
    B, n, H, T, D = q.shape
    rep = H // k.shape[2]
    out = torch.zeros(B, n, H, T, D, dtype=torch.float64)
    for b in range(B):
        for j in range(n):
            m = mask[b, j]
            if not m.any():
                continue
            kk, vv = (x[b, j].double().repeat_interleave(rep, 0)[:, m] for x in (k, v))
            w = torch.softmax(q[b, j].double() @ kk.transpose(-1, -2) / D ** 0.5, dim=-1)
            out[b, j] = w @ vv
    return out


@pytest.mark.parametrize("B, n", [(1, 3), (2, 1), (2, 3)])
def test_cross_attention_writes_into_a_strided_buffer(B, n):
    """The caption cross-attention writes its result straight into a strided view of the buffer linear_proj reads
    (one call per sample when both B and n exceed 1), equal to a plain per-chunk computation; a chunk without a
    valid caption key gets exactly zero, and no gradient reaches its caption."""
    from magi_train.model.attention import caption_cross_attention

    g = torch.Generator().manual_seed(0)
    H, Hkv, T, D, L = 4, 2, 5, 8, 6
    q_tokens = torch.randn(n * T, B, H, D, generator=g, requires_grad=True)        # [S, B, H, D] as the block has it
    k = torch.randn(B, n, Hkv, L, D, generator=g, requires_grad=True)
    v = torch.randn(B, n, Hkv, L, D, generator=g, requires_grad=True)
    mask = torch.rand(B, n, L, generator=g) > 0.4
    mask[..., 0] = True
    mask[-1, -1] = False
    buf = torch.zeros(n * T, B, 2, H, D)
    as_chunks = lambda x: x.view(n, T, B, H, D).permute(2, 0, 3, 1, 4)  # noqa: E731
    out = caption_cross_attention(as_chunks(q_tokens), k, v, mask, out=as_chunks(buf[:, :, 1]))
    assert out.data_ptr() == buf[:, :, 1].data_ptr() and (buf[:, :, 0] == 0).all()
    ref = _cross_reference(as_chunks(q_tokens), k, v, mask)
    torch.testing.assert_close(as_chunks(buf[:, :, 1]).double(), ref, rtol=1e-5, atol=1e-5)
    assert (out[-1, -1] == 0).all()
    out.sum().backward()
    assert (v.grad[-1, -1] == 0).all() and (k.grad[-1, -1] == 0).all() and v.grad.abs().sum() > 0


def test_attention_core_returns_the_heads_side_by_side():
    """AttentionCore's one [S, B, 2, H, D] result: self-attention heads then cross-attention heads, what
    linear_proj reads as a view (no concatenation), equal to the two attentions computed apart."""
    from magi_train.model.attention import caption_cross_attention
    from magi_train.model.block import AttentionCore, BlockContext

    g = torch.Generator().manual_seed(1)
    n, T, B, H, Hkv, D, L = 3, 4, 2, 4, 2, 8, 5
    q, qx = (torch.randn(n * T, B, H, D, generator=g) for _ in range(2))
    k, v = (torch.randn(n * T, B, Hkv, D, generator=g) for _ in range(2))
    kx, vx = (torch.randn(B, n, L, Hkv, D, generator=g) for _ in range(2))
    mask = torch.rand(B, n, L, generator=g) > 0.3
    layout = ChunkLayout.causal(n, T, lookback=2)
    ctx = BlockContext(cond=None, token_chunk=None, rope_cos=None, rope_sin=None, caption=torch.zeros(B, n, L, 1),
                       caption_mask=mask, layout=layout)
    out = AttentionCore("sdpa_chunked")(0, q, k, v, qx, kx, vx, ctx)
    assert out.shape == (n * T, B, 2, H, D) and out.flatten(-3).data_ptr() == out.data_ptr()
    p = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731
    a = chunk_causal_attention(p(q), p(k), p(v), layout, "reference").permute(2, 0, 1, 3)
    c = caption_cross_attention(qx.view(n, T, B, H, D).permute(2, 0, 3, 1, 4), kx.permute(0, 1, 3, 2, 4),
                                vx.permute(0, 1, 3, 2, 4), mask).permute(1, 3, 0, 2, 4).reshape(n * T, B, H, D)
    torch.testing.assert_close(out, torch.stack([a, c], dim=2), rtol=1e-5, atol=1e-5)


def test_strided_bf16_write_is_bit_exact():
    """Attention outputs reach linear_proj's buffer as 8-byte words outside autograd: the same bits as copy_."""
    from magi_train.model.attention import _write

    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 6, 5, 16, generator=g).to(torch.bfloat16).permute(1, 0, 2, 3)   # [6, 2, 5, 16] strided
    dst = torch.zeros(6, 2, 2, 5, 16, dtype=torch.bfloat16)[:, :, 1]                        # a half of the buffer
    assert _write(dst, src).data_ptr() == dst.data_ptr()
    assert torch.equal(dst.view(torch.int16), src.reshape(6, 2, 5, 16).contiguous().view(torch.int16))
    odd = torch.zeros(6, 2, 5, 18, dtype=torch.bfloat16)[..., 1:17]                         # misaligned: plain copy
    _write(odd, src)
    assert torch.equal(odd, src)



def test_compiled_dequantisation_writes_a_strided_view_exactly():
    """fused_ops.dequantize_into, compiled (the CUDA inference path) and eager, writes every element of a strided
    half of linear_proj's buffer with the eager arithmetic's bits, and nothing beside it."""
    from magi_train.model import fused_ops

    g = torch.Generator().manual_seed(1)
    x8 = (torch.randn(6, 2, 5, 16, generator=g) * 100).to(torch.float8_e4m3fn)
    descale = torch.full((1, 1, 1, 1), 0.37)
    want = (x8.float() * 0.37).to(torch.bfloat16)
    for compiled in (False, True):
        fused_ops.use_compiled(compiled)
        try:
            for n_rows in (6, 4):  # a second shape: the marked-dynamic dims serve it without a wrong specialisation
                buf = torch.full((n_rows, 2, 2, 5, 16), float("nan"), dtype=torch.bfloat16)
                dst = buf[:, :, 1]
                assert fused_ops.dequantize_into(dst, x8[:n_rows], descale).data_ptr() == dst.data_ptr()
                assert torch.isnan(buf[:, :, 0]).all() and torch.equal(buf[:, :, 1], want[:n_rows])
        finally:
            fused_ops.use_compiled(False)
