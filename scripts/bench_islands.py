"""A layer's fp32 islands at the 4.5B block's shapes: the Inductor islands against the Triton kernels.

  python scripts/bench_islands.py [--tokens 38160] [--batch 1] [--hidden 3072] [--heads 24]

Gated residual:
Rows: the eager island (gate gathered per token, then fp32 ops), the compiled Inductor island (what magi_infer ran
before the kernel: the gather, then one looped kernel), the Triton kernel (gate read per chunk), and the Triton
kernel also writing the MLP's input LayerNorm, against that island followed by nn.LayerNorm. Each with the bytes
it must move and the rate that makes. q norm + RoPE: the Inductor island (a norm kernel and a RoPE kernel)
against the Triton kernel, on a strided view of the fused q/qx/k/v projection as the block has it. The default
shape is a full 480p window of 4 chunks (4 x 9,540 tokens).
CUDA only."""
from __future__ import annotations

import argparse

import torch

from cuda_timing import median_seconds  # scripts/ is on the path when run as a script
from magi_train.model import fused_ops, triton_islands


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=38160)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_islands: needs CUDA")
    S, B, D, n = args.tokens, args.batch, args.hidden, args.chunks
    dt = torch.bfloat16
    x = torch.randn(S, B, D, device="cuda", dtype=dt)
    res = torch.randn(S, B, D, device="cuda", dtype=dt)
    gates = torch.randn(B, n, 2 * D, device="cuda", dtype=dt)[..., :D]
    tc = torch.arange(n, device="cuda").repeat_interleave(S // n + 1)[:S]
    w, b = torch.randn(D, device="cuda", dtype=dt), torch.randn(D, device="cuda", dtype=dt)
    ln = torch.nn.LayerNorm(D, device="cuda", dtype=dt)
    row = S * B * D * 2  # bytes of one [S, B, D] bf16 tensor

    def island():
        return fused_ops.gated_residual(x, res, gates, tc, w, b, 1e-6)[0]

    def inductor():
        fused_ops._state["compiled"] = True  # the compiled island, the kernel bypassed
        try:
            g = gates[:, tc].transpose(0, 1)
            fused_ops.mark_rows(x, res, g)
            return fused_ops._compiled("gated_residual")(x, res, g, w, b, 1e-6)
        finally:
            fused_ops._state["compiled"] = False

    # bytes each must move at the least: the gathered gate is written and read back (2 rows), x and the residual
    # read and y written (3), a LayerNorm reads y again and writes its output (2; 1 when fused into the kernel)
    rows = [("eager island (gather + fp32 ops)", island, 5 * row),
            ("Inductor island (gather + one looped kernel)", inductor, 5 * row),
            ("Triton kernel", lambda: triton_islands.gated_residual(x, res, gates, tc, w, b, 1e-6), 3 * row),
            ("Inductor island + nn.LayerNorm", lambda: ln(inductor()), 7 * row),
            ("Triton kernel with the LayerNorm", lambda: triton_islands.gated_residual(
                x, res, gates, tc, w, b, 1e-6, (ln.weight, ln.bias, ln.eps)), 4 * row)]
    with torch.no_grad():
        ref = inductor()
        err = (triton_islands.gated_residual(x, res, gates, tc, w, b, 1e-6)[0].float() - ref.float()).abs().max()
        print(f"shape [{S}, {B}, {D}], {n} chunks; max |Triton - Inductor| = {err.item():.3g}")
        print("| variant | ms | bytes it must move, GB | GB/s |")
        print("|---|---|---|---|")
        for name, fn, nbytes in rows:
            s = median_seconds(fn, args.iters)
            print(f"| {name} | {s * 1e3:.3f} | {nbytes / 1e9:.3f} | {nbytes / s / 1e9:.0f} |")
        norm_rope_table(args)


def norm_rope_table(args) -> None:
    """The q head norm + RoPE of one layer: Inductor island against the Triton kernel."""
    from magi_train.model.rope import LearnableRope3D

    S, B, H, hd = args.tokens, args.batch, args.heads, 128
    proj = torch.randn(S, B, (2 * H + 2 * H // 3) * hd, device="cuda", dtype=torch.bfloat16)
    q = proj[..., :H * hd].unflatten(-1, (H, hd))  # the block's strided view of the fused projection
    w, b = torch.randn(hd, device="cuda", dtype=torch.bfloat16), torch.randn(hd, device="cuda", dtype=torch.bfloat16)
    side = max(1, int((S / 6) ** 0.5))
    cos, sin = LearnableRope3D(hd).cuda()(0, S // (side * side) + 1, side, side)
    cos, sin = cos[:S], sin[:S]

    def inductor():
        fused_ops._state["compiled"] = True
        try:
            fused_ops.mark_rows(q)
            fused_ops.mark_rows(cos, sin, dims=1)
            return fused_ops._compiled("norm_rope")(q, w, b, 1e-6, cos, sin, torch.bfloat16)
        finally:
            fused_ops._state["compiled"] = False

    nbytes = 2 * S * B * H * hd * 2  # read q, write the result
    err = (triton_islands.norm_rope(q, w, b, 1e-6, cos, sin).float() - inductor().float()).abs().max()
    print(f"q norm + RoPE [{S}, {B}, {H}, {hd}]; max |Triton - Inductor| = {err.item():.3g}")
    print("| variant | ms | bytes it must move, GB | GB/s |")
    print("|---|---|---|---|")
    for name, fn in (("Inductor island (norm kernel + RoPE kernel)", inductor),
                     ("Triton kernel", lambda: triton_islands.norm_rope(q, w, b, 1e-6, cos, sin))):
        s = median_seconds(fn, args.iters)
        print(f"| {name} | {s * 1e3:.3f} | {nbytes / 1e9:.3f} | {nbytes / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
