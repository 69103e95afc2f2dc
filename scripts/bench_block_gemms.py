"""The block linears' GEMMs of one training step, bf16 against fp8 (torch._scaled_mm, tensorwise and rowwise
scales), and what that bounds fp8 training's speed-up to (Amdahl: only the linears get faster). CUDA only.

  python scripts/bench_block_gemms.py                        # 4.5B, 37,440 tokens, 34 layers, selective keep
  python scripts/bench_block_gemms.py --step-s 4.5 --keep qkv proj fc2

Each linear runs three GEMMs a step (forward, input gradient, weight gradient) plus its forward again when the
recompute policy runs it again (selective: the linears not kept; full: all). bf16 runs the q/qx/k/v projection
as one GEMM (as the block does); fp8 runs them as four (torchao converts each linear). The fp8 GEMMs are timed
on inputs already in e4m3: the casts and scale reductions torchao adds are left out, so the bound is generous.
--step-s (a measured bf16 step) gives: bound = step / (step - bf16 GEMMs + fp8 GEMMs)."""
from __future__ import annotations

import argparse

import torch

from cuda_timing import median_seconds as timed  # scripts/ is on the path when run as a script
from magi_train.config import model_preset

E4M3 = torch.float8_e4m3fn


def gemm(m: int, k: int, n: int, kind: str, fast_accum: bool) -> float:
    """Seconds of one [m, k] x [k, n] product (fresh random operands)."""
    a = torch.randn(m, k, device="cuda")
    b = torch.randn(n, k, device="cuda")     # column-major [k, n] for _scaled_mm
    if kind == "bf16":
        a, b = a.bfloat16(), b.bfloat16()
        return timed(lambda: a @ b.t())
    a8, b8 = a.to(E4M3), b.to(E4M3)
    if kind == "tensorwise":
        sa, sb = torch.ones((), device="cuda"), torch.ones((), device="cuda")
    else:
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    return timed(lambda: torch._scaled_mm(a8, b8.t(), sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="4.5B")
    ap.add_argument("--tokens", type=int, default=37440)
    ap.add_argument("--layers", type=int, default=None, help="default: the preset's")
    ap.add_argument("--recompute", default="selective", choices=["none", "full", "selective"])
    ap.add_argument("--keep", nargs="*", default=["qkv", "proj", "fc2"], help="selective: linears kept")
    ap.add_argument("--step-s", type=float, default=None, help="a measured bf16 step, for the Amdahl bound")
    args = ap.parse_args()
    cfg = model_preset(args.preset)
    layers = args.layers or cfg.num_layers
    D, qd, kvd, F = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.ffn_hidden_size
    ffn_out = F * (2 if cfg.gated_linear_unit else 1)
    M = args.tokens
    # name -> (in, out) per GEMM as it runs in bf16 and in fp8
    bf16 = {"qkv": [(D, 2 * qd + 2 * kvd)], "proj": [(2 * qd, D)], "fc1": [(D, ffn_out)], "fc2": [(F, D)]}
    fp8 = dict(bf16, qkv=[(D, qd), (D, qd), (D, kvd), (D, kvd)])
    rerun = {n: args.recompute == "full" or (args.recompute == "selective" and n not in args.keep) for n in bf16}
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; {args.preset} {layers} layers, {M} tokens, "
          f"recompute {args.recompute} (keep {' '.join(args.keep) if args.recompute == 'selective' else '-'})")
    print("| linear | runs again | bf16 ms | fp8 tensorwise ms | fp8 rowwise ms | (a step's GEMMs of one layer) |")
    print("|---|---|---|---|---|---|")
    total = {"bf16": 0.0, "tensorwise": 0.0, "rowwise": 0.0}
    for name in bf16:
        row = {}
        for kind, shapes in (("bf16", bf16[name]), ("tensorwise", fp8[name]), ("rowwise", fp8[name])):
            t = 0.0
            for k, n in shapes:
                fwd = gemm(M, k, n, kind, fast_accum=True)
                t += fwd * (2 if rerun[name] else 1)
                t += gemm(M, n, k, kind, fast_accum=False)            # input gradient
                t += gemm(n, M, k, kind, fast_accum=False)            # weight gradient
            row[kind] = t
            total[kind] += t * layers
        print(f"| {name} | {'yes' if rerun[name] else 'no'} | {1e3 * row['bf16']:.2f} | "
              f"{1e3 * row['tensorwise']:.2f} | {1e3 * row['rowwise']:.2f} | |")
    print(f"| all {layers} layers (s) | | {total['bf16']:.3f} | {total['tensorwise']:.3f} | {total['rowwise']:.3f} | |")
    if args.step_s:
        for kind in ("tensorwise", "rowwise"):
            bound = args.step_s / (args.step_s - total["bf16"] + total[kind])
            print(f"fp8 {kind}: GEMMs {total['bf16'] / total[kind]:.2f}x faster; linears {total['bf16'] / args.step_s:.0%}"
                  f" of the {args.step_s:.3f} s bf16 step -> fp8 step at best {args.step_s / bound:.3f} s = {bound:.2f}x")


if __name__ == "__main__":
    main()
