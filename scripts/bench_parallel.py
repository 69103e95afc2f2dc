"""Training throughput of parallel layouts at the MAGI-1 4.5B block shape: tokens/s per GPU, MFU, peak memory.

    torchrun --nproc-per-node 2 scripts/bench_parallel.py --layouts dp2,tp2,tp2.sp,cp2,pp2 --out bench.jsonl
    torchrun --nproc-per-node 4 scripts/bench_parallel.py --layouts dp4,tp4,tp2cp2,pp2dp2,tp2cp2.sp

A layout name lists its sizes (tp/cp/pp/dp; dp takes the rest of the world) and flags after dots: sp
(sequence parallel), ddp (instead of FSDP2), offload (FSDP CPU offload), i (interleaved 1F1B, 2 virtual
stages), ac (activation checkpointing). Every layout runs the same global batch per step: --batch samples per
microbatch and rank, --microbatches per step (the pipeline's microbatches when pp > 1). Layouts that do not
fit the world size are skipped. Prints a markdown table on rank 0."""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
import torch.distributed as dist


def parse_layout(name: str) -> dict:
    sizes, *flags = name.split(".")
    kw = {k: int(v) for k, v in re.findall(r"(tp|cp|pp|dp)(\d+)", sizes)}
    unknown = set(flags) - {"sp", "ddp", "offload", "i", "ac"}
    if unknown or re.sub(r"(tp|cp|pp|dp)\d+", "", sizes):
        raise ValueError(f"--layouts: cannot read {name!r} (sizes tpN cpN ppN dpN, flags .sp .ddp .offload .i .ac)")
    kw.setdefault("dp", -1)
    if "sp" in flags:
        kw["sequence_parallel"] = True
    if "ddp" in flags:
        kw["dp_mode"] = "ddp"
    if "offload" in flags:
        kw["fsdp_cpu_offload"] = True
    if "i" in flags:
        kw.update(pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    return kw, "ac" in flags


def bench(name: str, args, world: int) -> dict | None:
    from magi_train.parallel.transforms import ModelTransforms
    from magi_train.parallel.recompute import RecomputePolicy

    from magi_train.config import model_preset
    from magi_train.config.parallel_config import ParallelConfig
    from magi_train.parallel import forward_backward, init_parallel, parallelize
    from magi_train.training.flops import train_flops

    kw, ac = parse_layout(name)
    micro = args.microbatches
    if kw.get("pp", 1) > 1:
        kw["pp_microbatches"] = micro
    pcfg = ParallelConfig(**kw)
    mp = pcfg.tp * pcfg.cp * pcfg.pp
    if world % mp or (pcfg.dp != -1 and pcfg.dp * mp != world):
        return None
    cfg = model_preset("4.5B", num_layers=args.layers, attention_backend=args.attention)
    env = init_parallel(pcfg)

    model = parallelize(cfg, env=env, seed=0, transforms=ModelTransforms(recompute=RecomputePolicy("full" if ac else "none")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=env.device.type == "cuda" and not pcfg.fsdp_cpu_offload)
    g = torch.Generator().manual_seed(1 + env.dp_rank)
    T, H = args.frames, args.size
    n = T // cfg.chunk_width
    mbs = []
    for _ in range(micro):
        x = torch.randn(args.batch, cfg.latent_channels, T, H, H, generator=g)
        kwargs = dict(x=x, t=torch.rand(args.batch, n, generator=g),
                      caption=torch.randn(args.batch, args.caption_len, cfg.caption_channels, generator=g))
        mbs.append(({k: v.to(env.device) for k, v in kwargs.items()}, torch.randn(x.shape, generator=g).to(env.device),
                    torch.ones(args.batch, device=env.device)))

    def loss_fn(v, target, w):
        return (((v - target) ** 2).mean(dim=(1, 2, 3, 4)) * w).mean()

    def step():
        forward_backward(model, mbs, loss_fn, autocast_dtype=torch.bfloat16)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()
    dt = (time.perf_counter() - t0) / args.steps
    tokens_per_sample = (T // cfg.t_patch_size) * (H // cfg.patch_size) ** 2
    samples = args.batch * micro * env.dp
    flops = train_flops(cfg, T, H, H, args.caption_len) * samples
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=env.device)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(layout=name, world=world, tp=pcfg.tp, cp=pcfg.cp, pp=pcfg.pp, dp=env.dp, step_s=round(dt, 4),
                tokens_per_s_per_gpu=round(samples * tokens_per_sample / dt / world, 1),
                mfu=round(flops / dt / world / 989e12, 4), peak_gib=round(float(peak), 2),
                tokens_per_sample=tokens_per_sample, samples_per_step=samples, layers=cfg.num_layers,
                device=torch.cuda.get_device_name())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="dp2,tp2,tp2.sp,cp2,pp2")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers (4.5B has 34; throughput per layer "
                    "is what the table compares)")
    ap.add_argument("--frames", type=int, default=12, help="latent frames per sample (whole 6-frame chunks)")
    ap.add_argument("--size", type=int, default=48, help="latent height = width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--caption-len", type=int, default=128)
    ap.add_argument("--attention", default="sdpa_chunked")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    rows = []
    for name in args.layouts.split(","):
        res = bench(name, args, world)
        if res is None:
            if rank == 0:
                print(f"skip {name}: does not fit world size {world}", flush=True)
            continue
        rows.append(res)
        if rank == 0:
            print(json.dumps(res), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    if rank == 0 and rows:
        print(f"\n{rows[0]['device']}, 4.5B block shape x {args.layers} layers, {rows[0]['tokens_per_sample']} "
              f"tokens/sample, bf16\n")
        print("| layout | tp | cp | pp | dp | step (s) | tokens/s per GPU | MFU | peak GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['layout']} | {r['tp']} | {r['cp']} | {r['pp']} | {r['dp']} | {r['step_s']} | "
                  f"{r['tokens_per_s_per_gpu']:.0f} | {r['mfu']:.1%} | {r['peak_gib']} |")
    if dist.is_initialized():
        from magi_train.parallel import destroy_parallel

        destroy_parallel()


if __name__ == "__main__":
    main()
