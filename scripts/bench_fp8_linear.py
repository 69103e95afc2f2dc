"""MAGI-1 fp8 linears (Fp8Linear on torch._scaled_mm) against bf16, per call, at the 4.5B block's shapes.

  python scripts/bench_fp8_linear.py [--tokens 47700]

Variants: bf16 (F.linear), fp8 as first written (input quantised by separate fp32 ops, rows padded to 16),
Fp8Linear with compiled islands on (one fused quantisation kernel, no padding: what magi_infer runs on CUDA), and
the e4m3 GEMM alone (input already quantised): the gap between the last two is what the input's quantisation
costs. CUDA only."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from magi_train.model import fused_ops
from magi_train.precision.magi_fp8 import E4M3, Fp8Linear, _to_e4m3, quantize_weight

SHAPES = {"q / qx (3072 -> 3072)": (3072, 3072), "k / v (3072 -> 1024)": (3072, 1024),
          "fc1 (3072 -> 12288)": (3072, 12288), "fc2 (12288 -> 3072)": (12288, 3072),
          "proj (6144 -> 3072)": (6144, 3072)}


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def first_version(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward before the fused quantisation: fp32 ops over the input, row padding, a cast at the end."""
    xq = _to_e4m3(x, layer._divisor())
    pad = (-xq.shape[0]) % 16
    xp = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(E4M3) if pad else xq
    y = torch._scaled_mm(xp, layer.weight[0].t(), scale_a=layer.input_scale.flatten()[:1].float(),
                         scale_b=layer.weight_scale.float(), out_dtype=torch.bfloat16)[: xq.shape[0]]
    return y.to(x.dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=47700, help="rows: a full 480p window is 5 x 9540 tokens")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    fused_ops.use_compiled(True)  # Fp8Linear's fused input quantisation, as magi_infer's default on CUDA
    rows = []
    for name, (k, n) in SHAPES.items():
        kind = "per_channel" if name.startswith(("fc2", "proj")) else "per_tensor"
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
        layer = Fp8Linear(k, n, kind).to(dev)
        layer.load_state_dict(quantize_weight(w, kind), strict=True)
        xq = _to_e4m3(x, layer._divisor())
        ms = {
            "bf16": timed(lambda: F.linear(x, w), args.iters),
            "fp8 first version": timed(lambda: first_version(layer, x), args.iters),
            "fp8 now": timed(lambda: layer(x), args.iters),
            "e4m3 GEMM alone": timed(lambda: torch._scaled_mm(xq, layer.weight[0].t(), scale_a=layer.input_scale[:1].float(),
                                                              scale_b=layer.weight_scale, out_dtype=torch.bfloat16),
                                     args.iters),
        }
        ref = F.linear(x.float(), w.float())
        err = float((layer(x).float() - ref).norm() / ref.norm())
        rows.append((name, ms, 2 * args.tokens * k * n, err))
    print(f"tokens {args.tokens}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| linear | bf16 ms | fp8 first version ms | fp8 now ms | e4m3 GEMM alone ms | now vs bf16 | fp8 rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, flops, err in rows:
        print(f"| {name} | {ms['bf16']:.3f} | {ms['fp8 first version']:.3f} | {ms['fp8 now']:.3f} | "
              f"{ms['e4m3 GEMM alone']:.3f} ({flops / ms['e4m3 GEMM alone'] / 1e9:.0f} TFLOP/s) | "
              f"{ms['bf16'] / ms['fp8 now']:.2f}x | {err:.4f} |")


if __name__ == "__main__":
    main()
