"""MAGI-1 fp8 linears (Fp8Linear on torch._scaled_mm) against bf16, per call, at the 4.5B block's shapes.

  python scripts/bench_fp8_linear.py [--tokens 47700]

Variants: bf16 (F.linear), fp8 as first written (input quantised by separate fp32 ops, rows padded to 16),
Fp8Linear with compiled islands on (one fused quantisation kernel, no padding: what magi_infer runs on CUDA), and
the e4m3 GEMM alone (input already quantised): the gap between the last two is what the input's quantisation
costs. Last row: the block's q/qx/k/v projection of one input, bf16 as one GEMM over the stacked weights (what the
model runs), fp8 as four Fp8Linear calls (first version / now) against Fp8Linear.fused_forward (one quantisation,
one rowwise-scaled e4m3 GEMM). CUDA only."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from cuda_timing import median_seconds  # scripts/ is on the path when run as a script
from magi_train.model import fused_ops
from magi_train.precision.magi_fp8 import E4M3, Fp8Linear, _to_e4m3, quantize_weight

SHAPES = {"q / qx (3072 -> 3072)": (3072, 3072), "k / v (3072 -> 1024)": (3072, 1024),
          "fc1 (3072 -> 12288)": (3072, 12288), "fc2 (12288 -> 3072)": (12288, 3072),
          "proj (6144 -> 3072)": (6144, 3072)}


def timed(fn, iters: int) -> float:
    """Median GPU milliseconds of one call."""
    return median_seconds(fn, iters) * 1e3


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
    # q/qx/k/v of one input: separate Fp8Linear calls vs the fused one
    k, outs = 3072, (3072, 3072, 1024, 1024)
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for n in outs]
    layers = []
    for w in ws:
        layer = Fp8Linear(k, w.shape[0], "per_tensor").to(dev)
        layer.load_state_dict(quantize_weight(w, "per_tensor"), strict=True)
        layers.append(layer)
    x = torch.randn(args.tokens, k, device=dev, dtype=torch.bfloat16)
    w_all = torch.cat(ws)
    xq = _to_e4m3(x, layers[0]._divisor())
    fused = Fp8Linear.fused_forward
    ms = {"bf16": timed(lambda: F.linear(x, torch.cat(ws)), args.iters),
          "fp8 first version": timed(lambda: [first_version(m, x) for m in layers], args.iters),
          "fp8 now": timed(lambda: fused(x, layers), args.iters),
          "e4m3 GEMM alone": timed(lambda: [torch._scaled_mm(xq, m.weight[0].t(), scale_a=m.input_scale[:1].float(),
                                                             scale_b=m.weight_scale, out_dtype=torch.bfloat16)
                                            for m in layers], args.iters)}
    separate = timed(lambda: [m(x) for m in layers], args.iters)
    ref = F.linear(x.float(), w_all.float())
    err = float((torch.cat(fused(x, layers), -1).float() - ref).norm() / ref.norm())
    sep_err = float((torch.cat([m(x) for m in layers], -1).float() - torch.cat(fused(x, layers), -1).float()).norm()
                    / ref.norm())
    rows.append(("q/qx/k/v (3072 -> 8192), fp8 now = fused_forward", ms, 2 * args.tokens * k * sum(outs), err))
    print(f"tokens {args.tokens}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"q/qx/k/v as four Fp8Linear calls: {separate:.3f} ms; fused vs four calls rel. difference {sep_err:.2e}")
    print("| linear | bf16 ms | fp8 first version ms | fp8 now ms | e4m3 GEMM alone ms | now vs bf16 | fp8 rel. error |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, flops, err in rows:
        print(f"| {name} | {ms['bf16']:.3f} | {ms['fp8 first version']:.3f} | {ms['fp8 now']:.3f} | "
              f"{ms['e4m3 GEMM alone']:.3f} ({flops / ms['e4m3 GEMM alone'] / 1e9:.0f} TFLOP/s) | "
              f"{ms['bf16'] / ms['fp8 now']:.2f}x | {err:.4f} |")


if __name__ == "__main__":
    main()
