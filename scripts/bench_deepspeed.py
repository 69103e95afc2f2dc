"""One GPU, MAGI-1 4.5B-width blocks: DeepSpeed ZeRO-3 with CPU or NVMe offload against FSDP2 with CPU offload
(and the plain model): peak GPU memory and step time. Prints a markdown table.

    python scripts/bench_deepspeed.py                                   # fsdp_offload, zero3_cpu, zero3_nvme
    python scripts/bench_deepspeed.py --modes plain,zero3,zero3_cpu --layers 4 --nvme /local/nvme

Every mode runs in its own process (a clean CUDA allocator and process group) through the training path's
pieces: parallelize, build_optimizer (train.optimizer defaults: AdamW), forward_backward with bf16 autocast and
fp32 master weights, the global-norm clip (1.0) and the update; DeepSpeed through deepspeed_engine.attach,
exactly what parallel.dp_mode=deepspeed does in magi_train.train. FSDP2 with CPU offload on one GPU is wrapped
here directly (apply_fsdp over the one-rank group): the entry point wraps FSDP2 only with dp x cp > 1.

Modes: plain (no wrapper, everything on the GPU), fsdp_offload (FSDP2, CPUOffloadPolicy: weights, gradients,
AdamW on the CPU), zero3 (ZeRO-3, no offload), zero3_cpu (ZeRO-3, weights and optimizer offloaded to CPU),
zero3_opt_cpu (ZeRO-3, optimizer only), zero3_nvme (ZeRO-Infinity: weights and optimizer on NVMe at --nvme).
Peak GiB: torch.cuda.max_memory_allocated over the timed steps (pinned host buffers are not GPU memory and are
left out)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("plain", "fsdp_offload", "zero3", "zero3_cpu", "zero3_opt_cpu", "zero3_nvme")


def run_mode(mode: str, args) -> dict:
    import dataclasses

    import torch
    import torch.distributed as dist

    from magi_train.config import OptimizerConfig, model_preset
    from magi_train.config.deepspeed_config import DeepSpeedConfig
    from magi_train.config.parallel_config import ParallelConfig
    from magi_train.parallel import forward_backward, parallelize
    from magi_train.parallel.deepspeed_engine import attach, ensure_process_group, optimizer_step
    from magi_train.parallel.env import ParallelEnv
    from magi_train.parallel.grads import clip_grad_norm_
    from magi_train.training.optim import build_optimizer

    cuda = torch.cuda.is_available()     # CPU: a smoke run of the script (--preset tiny), no memory figures
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = model_preset(args.preset, num_layers=args.layers, attention_backend=args.attention, params_dtype="float32")
    deepspeed = mode.startswith("zero3")
    pcfg = ParallelConfig(dp=1, dp_mode="deepspeed" if deepspeed else "none")
    env = ParallelEnv(pcfg=pcfg, device=device)
    ensure_process_group(env)
    model = parallelize(cfg, env=env, seed=0)
    plan = model.magi_parallel
    if mode == "fsdp_offload":
        from magi_train.parallel.data_parallel import apply_fsdp

        wrap_env = dataclasses.replace(env, dp_cp_group=dist.group.WORLD)
        apply_fsdp(model, model.held_layers(), wrap_env, cfg, cpu_offload=True)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-5))
    if deepspeed:
        offload = {"zero3": ("none", "none"), "zero3_cpu": ("cpu", "cpu"), "zero3_opt_cpu": ("cpu", "none"),
                   "zero3_nvme": ("nvme", "nvme")}[mode]
        dcfg = DeepSpeedConfig(zero_stage=3, offload_optimizer=offload[0], offload_param=offload[1],
                               nvme_path=args.nvme if "nvme" in offload else None)
        attach(model, optimizer, dcfg, grad_clip=1.0, micro_batch=args.batch)

    g = torch.Generator().manual_seed(1)
    T, H = args.frames, args.size
    n = T // cfg.chunk_width
    mbs = []
    for _ in range(args.microbatches):
        x = torch.randn(args.batch, cfg.latent_channels, T, H, H, generator=g)
        kwargs = dict(x=x, t=torch.rand(args.batch, n, generator=g),
                      caption=torch.randn(args.batch, args.caption_len, cfg.caption_channels, generator=g))
        mbs.append(({k: v.to(device) for k, v in kwargs.items()}, torch.randn(x.shape, generator=g).to(device),
                    torch.ones(args.batch, device=device)))

    def loss_fn(v, target, w):
        return (((v - target) ** 2).mean(dim=(1, 2, 3, 4)) * w).mean()

    def step() -> float:
        if not deepspeed:
            optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, mbs, loss_fn, autocast_dtype=torch.bfloat16)
        if deepspeed:
            optimizer_step(plan)
        else:
            clip_grad_norm_(plan, 1.0)
            optimizer.step()
        return float(loss)

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters()) if not deepspeed else \
        sum(p.ds_numel for p in model.parameters())
    return dict(mode=mode, layers=args.layers, params_m=round(params / 1e6, 1),
                tokens=args.batch * args.microbatches * T * (H // cfg.patch_size) ** 2,
                step_s=round(statistics.median(times), 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else float("nan"),
                loss=round(statistics.fmean(losses), 5), device=torch.cuda.get_device_name() if cuda else "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="fsdp_offload,zero3_cpu,zero3_nvme", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--preset", default="4.5B", help="model width (model.preset); tiny for a CPU smoke run")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=12, help="latent frames a sample (whole chunks)")
    ap.add_argument("--size", type=int, default=48, help="latent height = width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--caption-len", type=int, default=64)
    ap.add_argument("--attention", default="sdpa_chunked")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nvme", default="/tmp/magi_nvme", help="zero3_nvme: a directory on a local NVMe drive")
    ap.add_argument("--timeout", type=int, default=240, help="seconds a mode may take")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)     # the child process of one mode
    ap.add_argument("--out", default=None, help="also append the rows (json lines) to this file")
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_mode(args.one, args)), flush=True)
        return 0
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            ap.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        if mode == "zero3_nvme":
            os.makedirs(args.nvme, exist_ok=True)
        cmd = [sys.executable, __file__, "--one", mode] + [a for a in (argv or sys.argv[1:]) if a != "--one"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out = proc.stdout + proc.stderr
            row = next((json.loads(ln[4:]) for ln in out.splitlines() if ln.startswith("ROW ")), None)
            if row is None:
                lines = [ln for ln in out.strip().splitlines() if ln.strip()]
                err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
                row = {"mode": mode, "error": f"exit {proc.returncode}: {err.strip()[:200]}"}
        except subprocess.TimeoutExpired:
            row = {"mode": mode, "error": f"over {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| mode | layers | params (M) | tokens/step | s/step | peak GPU GiB | mean loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | failed: {r['error']} |")
        else:
            print(f"| {r['mode']} | {r['layers']} | {r['params_m']} | {r['tokens']} | {r['step_s']} | "
                  f"{r['peak_gib']} | {r['loss']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
