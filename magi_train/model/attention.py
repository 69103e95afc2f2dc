"""Chunk-causal self-attention behind one function, and per-chunk cross-attention to captions.

Backends (model.attention_backend):
  auto          the fastest exact backend for the device the tensors are on (resolve_backend); the default.
  reference     SDPA with a dense boolean mask; runs anywhere; ground truth for the others; only when asked.
  sdpa_chunked  one unmasked SDPA per query chunk over its contiguous key slice (cuDNN/flash on GPU).
  flex          torch flex_attention with a block mask (GPU; compiled).
  flash_attn    flash-attn's kernel per query chunk (optional package).
  cudnn_fp8     sdpa_chunked's calls as cuDNN fp8 (e4m3) attention, Hopper+, optional package (attention_fp8.py).
All take q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (GQA: Hq a multiple of Hkv) and return [B, Hq, Sq, D]; given
`out` (any strides, e.g. a view of the buffer linear_proj reads) they write the result there and return it."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .attention_fp8 import chunk_attention_fp8
from .chunk_layout import ChunkLayout


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA of q [B, Hq, Sq, D] over k/v [B, Hkv, Sk, D], query head h reading KV head h // (Hq/Hkv)
    (repeat_interleave's grouping), without a repeated copy of K/V. On CUDA through SDPA's enable_gqa: cuDNN reads
    the strided views as they are and writes its output in q's memory layout, so nothing is copied (the H200,
    4.5B heads, 37,440 tokens: forward+backward 72.1 ms against 72.7 folding and 74.0 repeating K/V,
    docs/benchmarks.md). Elsewhere the rep query heads of a group fold into the sequence dimension
    ([B, Hkv, rep*Sq, D]; exact: with no mask every query row of a group attends to the same keys), since the CPU
    kernels take enable_gqa only on the slow math path."""
    B, Hq, Sq, D = q.shape
    rep = Hq // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], rep * Sq, D), k, v)
    return out.reshape(B, Hq, Sq, D)


def _write(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst.copy_(src). Outside autograd, 16-bit rows (the last dim contiguous, a multiple of 4) move as 8-byte
    words, bit for bit: both attention outputs' writes took 26 ms of a 3.7 s distilled 480p chunk on the H200
    (ATen's strided copy of bf16 elements: about 0.7 TB/s; an Inductor copy kernel instead: 60 ms,
    docs/benchmarks.md issue 19)."""
    words = (not (src.requires_grad or dst.requires_grad) and src.dtype == dst.dtype and src.element_size() == 2
             and all(x.stride(-1) == 1 and x.shape[-1] % 4 == 0 and x.storage_offset() % 4 == 0
                     and all(s % 4 == 0 for s in x.stride()[:-1]) for x in (src, dst)))
    if not words:
        return dst.copy_(src)
    dst.view(torch.int64).copy_(src.view(torch.int64))
    return dst


def _reference(q, k, v, layout: ChunkLayout):
    k, v = _expand_kv(q, k, v)
    mask = layout.dense_mask(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_chunked(q, k, v, layout: ChunkLayout, out: torch.Tensor | None = None):
    """One SDPA per query chunk over its key slice, each chunk's output written straight into `out` (one copy,
    no concatenation)."""
    t = layout.tokens_per_chunk
    out = q.new_empty(q.shape) if out is None else out
    for i, sl in enumerate(layout.kv_slices()):
        qi = q[:, :, i * t:(i + 1) * t]
        if sl is None:  # non-contiguous visibility: masked call for this chunk only (K/V repeated for it)
            mask = layout.dense_mask(q.device)[i * t:(i + 1) * t]
            ke, ve = _expand_kv(q, k, v)
            oi = F.scaled_dot_product_attention(qi, ke, ve, attn_mask=mask)
        else:
            oi = _sdpa_grouped(qi, k[:, :, sl[0]:sl[1]], v[:, :, sl[0]:sl[1]])
        _write(out[:, :, i * t:(i + 1) * t], oi)
    return out


@functools.lru_cache(maxsize=64)
def _flex_block_mask(layout: ChunkLayout, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    t = layout.tokens_per_chunk
    kv_chunk = torch.tensor(layout.kv_chunks, device=device)
    start = torch.tensor(layout.kv_start, device=device)
    end = torch.tensor(layout.kv_end, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        c = kv_chunk[kv_idx // t]
        qi = q_idx // t
        return (c >= start[qi]) & (c <= end[qi])

    return create_block_mask(mask_mod, None, None, layout.q_len, layout.kv_len, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, layout: ChunkLayout):
    if q.device.type != "cuda":
        raise RuntimeError("model.attention_backend='flex' needs a CUDA device; use 'reference' or 'sdpa_chunked' on CPU")
    block_mask = _flex_block_mask(layout, str(q.device))
    enable_gqa = q.shape[1] != k.shape[1]
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _flash_attn(q, k, v, layout: ChunkLayout):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:  # optional extra
        raise RuntimeError("model.attention_backend='flash_attn' needs the flash-attn package "
                           "(pip install 'magi[flash]'); accepted without it: reference, sdpa_chunked, flex") from e
    t = layout.tokens_per_chunk
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # flash-attn wants [B, S, H, D]
    outs = []
    for i, sl in enumerate(layout.kv_slices()):
        if sl is None:
            raise RuntimeError("flash_attn backend needs contiguous key chunks per query chunk")
        outs.append(flash_attn_func(qt[:, i * t:(i + 1) * t], kt[:, sl[0]:sl[1]], vt[:, sl[0]:sl[1]]))
    return torch.cat(outs, dim=1).transpose(1, 2)


BACKENDS = {"reference": _reference, "sdpa_chunked": _sdpa_chunked, "flex": _flex, "flash_attn": _flash_attn,
            "cudnn_fp8": chunk_attention_fp8}
# What 'auto' picks per device type. Per-chunk SDPA is exact and the fastest measured on CUDA (cuDNN: 92-97% of
# dense attention's rate, 1.3-1.5x flex; docs/benchmarks.md); on the CPU it also skips the dense S x S mask.
AUTO_BACKENDS = {"cuda": "sdpa_chunked", "cpu": "sdpa_chunked"}


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that runs for `backend` on `device`: 'auto' -> the device's fastest exact one, others as given."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"model.attention_backend: got {backend!r}, accepted values are auto, {', '.join(BACKENDS)}")
        return backend
    return AUTO_BACKENDS.get(torch.device(device).type, "sdpa_chunked")


def chunk_causal_attention(q, k, v, layout: ChunkLayout, backend: str = "auto",
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk-causal attention [B, Hq, Sq, D]; written into `out` when given (sdpa_chunked writes each chunk there,
    the other backends copy their result)."""
    if q.shape[2] != layout.q_len or k.shape[2] != layout.kv_len:
        raise ValueError(f"attention: q/k lengths {q.shape[2]}/{k.shape[2]} do not match the chunk layout "
                         f"{layout.q_len}/{layout.kv_len}")
    name = resolve_backend(backend, q.device)
    if name == "sdpa_chunked":
        return _sdpa_chunked(q, k, v, layout, out)
    if name == "cudnn_fp8":  # dequantises its output straight into `out` outside autograd
        return chunk_attention_fp8(q, k, v, layout, out)
    result = BACKENDS[name](q, k, v, layout)
    return result if out is None else _write(out, result)


def caption_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Each chunk's tokens attend to that chunk's own caption tokens.

    q [B, n, Hq, T, D] (T tokens of each chunk), k/v [B, n, Hkv, L, D], mask [B, n, L] bool; the result
    [B, n, Hq, T, D] goes into `out` when given (any strides). A chunk whose caption has no valid token gets a zero
    output (MAGI-1: empty key range)."""
    B, n, H, T, D = q.shape
    out = q.new_empty(q.shape) if out is None else out
    # SDPA takes one batch dim: samples x chunks, viewed from the token-major q when B or n is 1, else one
    # call per sample (flattening both would copy the queries)
    groups = [slice(None)] if B == 1 or n == 1 else [slice(b, b + 1) for b in range(B)]
    for g in groups:
        q2 = q[g].flatten(0, 1)
        m = mask[g].reshape(q2.shape[0], 1, 1, -1)
        has_key = m.any(dim=-1, keepdim=True)
        safe = m | ~has_key  # avoid NaN rows; zero values give them a zero output (exact, gradients too)
        # repeating K/V is the cheap side here: a caption is tens of tokens, the queries are a whole chunk
        k2, v2 = _expand_kv(q2, k[g].flatten(0, 1), v[g].flatten(0, 1) * has_key.to(v.dtype))
        o = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=safe)
        _write(out[g], o.reshape(out[g].shape))
    return out
