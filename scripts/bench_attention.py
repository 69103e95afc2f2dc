#!/usr/bin/env python
"""Chunk-causal attention backends: effective TFLOP/s, forward and forward+backward.

Default shape: the 4.5B model's heads (24 query heads, 8 KV heads, head dim 128) at 480p
(480x832 px -> 30x52 tokens a latent frame, 6 frames a chunk = 9360 tokens), 2-8 chunks, bf16.
'Effective' counts only the query/key pairs the chunk-causal mask allows: 4*B*H*hd*pairs for the
forward, 3.5x that for forward+backward (FlashAttention's convention). dense_nomask is full attention
over the same length (it does ~2x the work of causal), the ceiling each backend is compared with.
sdpa_chunked serves grouped KV heads by folding a group's query heads into the sequence; sdpa_chunked+expand is
sdpa_chunked given K/V repeated to the query heads first (repeat_interleave, timed), as it ran before;
sdpa_chunked+enable_gqa is the same per-chunk calls through SDPA's enable_gqa. The 'kernel' column names the
SDPA kernel each one reached.

    python scripts/bench_attention.py                      # GPU, full table
    python scripts/bench_attention.py --device cpu --tokens-per-chunk 64 --heads 4 --kv-heads 2 --head-dim 32
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from magi_train.model import ChunkLayout, chunk_causal_attention
from magi_train.parallel.recompute import attention_ops


def visible_pairs(layout: ChunkLayout) -> int:
    return int(layout.chunk_mask().sum()) * layout.tokens_per_chunk ** 2


def timeit(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def run_case(backend, n, args, dtype):
    T, H, Hkv, D = args.tokens_per_chunk, args.heads, args.kv_heads, args.head_dim
    S = n * T
    q = torch.randn(1, H, S, D, device=args.device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, Hkv, S, D, device=args.device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, Hkv, S, D, device=args.device, dtype=dtype, requires_grad=True)
    layout = ChunkLayout.causal(n, T)
    if backend == "dense_nomask":
        def fwd():
            kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            return F.scaled_dot_product_attention(q, kk, vv)
        pairs = S * S
    elif backend == "sdpa_chunked+expand":
        def fwd():
            kk, vv = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            return chunk_causal_attention(q, kk, vv, layout, "sdpa_chunked")
        pairs = visible_pairs(layout)
    elif backend == "sdpa_chunked+enable_gqa":
        def fwd():
            outs = [F.scaled_dot_product_attention(q[:, :, i * T:(i + 1) * T], k[:, :, a:b], v[:, :, a:b],
                                                   enable_gqa=True) for i, (a, b) in enumerate(layout.kv_slices())]
            return torch.cat(outs, dim=2)
        pairs = visible_pairs(layout)
    else:
        def fwd():
            return chunk_causal_attention(q, k, v, layout, backend)
        pairs = visible_pairs(layout)
    grad = torch.randn(1, H, S, D, device=args.device, dtype=dtype)

    def fwd_bwd():
        out = fwd()
        out.backward(grad)

    flops = 4 * H * D * pairs
    with torch.no_grad():
        t_f = timeit(fwd, args.device, args.iters, args.warmup)
    t_fb = timeit(fwd_bwd, args.device, args.iters, args.warmup)
    return t_f, t_fb, flops / t_f / 1e12, 3.5 * flops / t_fb / 1e12, kernels(fwd)


def kernels(fn) -> str:
    """The SDPA kernels (aten ops) one call of fn reaches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in attention_ops() and func.__name__ not in seen:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        fn()
    return " ".join(n.split(".")[0].replace("_scaled_dot_product_", "") for n in seen) or "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens-per-chunk", type=int, default=9360)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--backends", nargs="+", default=["sdpa_chunked", "sdpa_chunked+expand", "sdpa_chunked+enable_gqa",
                                                       "flex", "flash_attn", "reference", "dense_nomask"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-reference-tokens", type=int, default=20000,
                    help="skip the dense-mask reference above this length (its mask is S^2 bytes)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype if args.device == "cuda" else "float32")
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# device={dev} dtype={dtype} heads={args.heads}/{args.kv_heads} hd={args.head_dim} "
          f"tokens/chunk={args.tokens_per_chunk} torch={torch.__version__}")
    print("| backend | chunks | tokens | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.chunks:
        for backend in args.backends:
            S = n * args.tokens_per_chunk
            if backend == "reference" and S > args.max_reference_tokens:
                print(f"| {backend} | {n} | {S} | skipped (dense mask of {S}x{S}) | | | | |")
                continue
            try:
                t_f, t_fb, tf_f, tf_fb, kern = run_case(backend, n, args, dtype)
                print(f"| {backend} | {n} | {S} | {t_f*1e3:.2f} | {t_fb*1e3:.2f} | {tf_f:.1f} | {tf_fb:.1f} | {kern} |",
                      flush=True)
            except Exception as e:  # a missing optional backend must not end the table
                print(f"| {backend} | {n} | {S} | unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
