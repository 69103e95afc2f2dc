"""Inference speed through the CLI's own pipeline (MagiRunner: text encoder, DiT window loop, VAE decode on a second
thread, streamed mp4), random weights: first-chunk latency and the steady rate with the window full.

  python scripts/bench_infer.py                                   # tiny model on the CPU
  python scripts/bench_infer.py --model 4.5B --height 480 --width 848 --num_steps 8 --window_size 4 \
      --distill --num_chunks 12 [--fp8] [--compile off]
  python scripts/bench_infer.py --config_file configs/infer/4.5B_base.json --height 480 --width 848 ...

Steady state: a chunk leaves the window every num_steps / window_size forwards; the chunks finished while the
window is full (chunks 1 .. n - window_size) each take one such stage, the first also waits for the window to
fill (and, cold, for torch.compile: a warm-up run first takes that out; by default it runs window_size + 2 chunks,
so every window shape, full ones included, has been compiled and planned before the timed run: with a one-chunk
warm-up the first full-window stage paid 0.3-1.2 s of one-time set-up inside the steady figure). A chunk counts as done when its decoded
pixels are in the mp4. Left out: the real T5 (the hash encoder stands in: text is encoded once per prompt) and
the MAGI-1 VAE (an untrained small VAE decodes, overlapped with denoising either way). Random weights include the
final projection (zero at init), so the velocities are not 0. --fp8 quantises the blocks to the MAGI-1 fp8 format
(quantize_to_magi_fp8, weights-only scales), with cuDNN fp8 attention where it runs (the format's default;
model.attention_backend=sdpa_chunked keeps bf16 attention), and first compares one window forward with bf16
(bf16 weights, exact attention). --profile DIR runs
the timed run under torch.profiler and prints where the steady state's GPU time goes (kernel kinds, idle time,
host waits). The profiler adds host time per launch: its timings hold while the summary shows the host ahead of
the GPU in every stage."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from magi_infer.config import load_infer_config
from magi_infer.runner import MagiRunner, attention_backend, build_model, describe_run, resolve_device, resolve_dtype
from magi_train.model.block import AttentionCore


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config_file", help="MAGI-1 example json or configs/infer/*.yaml (else --model)")
    p.add_argument("--model", default="tiny", help="preset when no config file: tiny, debug, 4.5B, 24B")
    p.add_argument("--height", type=int, default=64, help="video height in pixels (latent = /8)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num_chunks", type=int, default=12, help="chunks to generate (>= window_size + 2 for a steady state)")
    p.add_argument("--num_steps", type=int)
    p.add_argument("--window_size", type=int)
    p.add_argument("--cfg_number", type=int, choices=(1, 2, 3))
    p.add_argument("--distill", action="store_true", help="step-size conditioned model, cfg_number 1")
    p.add_argument("--fp8", action="store_true", help="MAGI-1 fp8 format: quantise the random weights, then run")
    p.add_argument("--compile", choices=("auto", "on", "off"), help="default: the config's (auto: on for CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"))
    p.add_argument("--warmup_chunks", type=int,
                   help="untimed run of this many chunks first (compile, kernel selection); 0: none; default "
                        "window_size + 2: every window shape of the timed run (filling, full, draining) once")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--profile", metavar="DIR", help="profile the timed run (CUDA): trace to DIR, summary printed")
    p.add_argument("overrides", nargs="*", help="key=value, as for python -m magi_infer")
    return p.parse_args(argv)


def infer_config(args, num_chunks: int):
    ov = {"video_size_h": args.height, "video_size_w": args.width, "device": args.device, "dtype": args.dtype,
          "seed": 0}
    if not args.config_file:
        ov["model.preset"] = args.model
    for key in ("num_steps", "window_size"):
        if getattr(args, key) is not None:
            ov[key] = getattr(args, key)
    if args.compile in ("on", "off"):
        ov["compile"] = args.compile == "on"
    if args.distill:
        ov.update({"model.distill": True, "cfg_number": 1})
    elif args.cfg_number is not None:
        ov["cfg_number"] = args.cfg_number
    if args.fp8:
        ov["fp8_quant"] = True  # what the run reports; the weights are quantised here (no checkpoint to read)
    pairs = [f"{k}={v}" for k, v in ov.items()] + list(args.overrides)  # parsed as the CLI parses them
    cfg = load_infer_config(args.config_file, pairs)
    cfg.num_frames = num_chunks * cfg.model.chunk_width * cfg.temporal_downsample_factor
    return cfg


@torch.no_grad()
def fp8_error(model, cfg, device) -> dict:
    """Quantise model in place to the MAGI-1 fp8 format; relative error of one 2-chunk window forward vs before."""
    from magi_train.checkpoint.magi_format import load_magi_state_dict, quantize_to_magi_fp8

    m = cfg.model
    g = torch.Generator().manual_seed(3)
    h, w = cfg.video_size_h // 8, cfg.video_size_w // 8
    x = torch.randn(1, m.latent_channels, 2 * m.chunk_width, h, w, generator=g).to(device)
    t = torch.tensor([[0.7, 0.3]], device=device)
    cap = (torch.randn(1, 2, m.caption_max_length, m.caption_channels, generator=g) * 0.1).to(device)
    mask = torch.zeros(1, 2, m.caption_max_length, dtype=torch.bool, device=device)
    mask[..., :64] = True
    dt = torch.full((1, 2), 4.0, device=device) if m.distill else None
    cores = [c for c in model.modules() if isinstance(c, AttentionCore)]
    for c in cores:  # the reference: bf16 weights and exact attention
        c.backend = "sdpa_chunked"
    ref = model(x, t, cap, mask, None, dt).float()
    load_magi_state_dict(model, quantize_to_magi_fp8(model))
    backend = attention_backend(cfg, device)  # what the fp8 run uses (cudnn_fp8 by default where it runs)
    for c in cores:
        c.backend = backend
    out = model(x, t, cap, mask, None, dt).float()
    return {"fp8_rel_error": float((out - ref).norm() / ref.norm()), "fp8_finite": bool(torch.isfinite(out).all()),
            "fp8_attention": backend}


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = infer_config(args, args.num_chunks)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    print(describe_run(cfg, device, dtype), flush=True)
    torch.manual_seed(0)
    # --fp8: the bf16 model is built, then quantised to the MAGI-1 fp8 format (no fp8 checkpoint to read)
    model = build_model(dataclasses.replace(cfg, fp8_quant=False), device, dtype)
    torch.nn.init.normal_(model.final_linear.linear.weight, std=0.02)  # random weights: v is not 0
    result = fp8_error(model, cfg, device) if args.fp8 else {}
    runner = MagiRunner(cfg, model=model)
    prompt = ["a red ball bounces across a wooden floor"]
    out_dir = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    warm_s = 0.0
    warm_chunks = cfg.sampler.window_size + 2 if args.warmup_chunks is None else args.warmup_chunks
    if warm_chunks:
        start = time.perf_counter()
        warm_cfg = infer_config(args, warm_chunks)
        MagiRunner(warm_cfg, model=model, text_encoder=runner.text_encoder, vae=runner.vae).run(
            "t2v", prompt, str(out_dir / "warmup.mp4"), progress=False)
        warm_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prof = None
    if args.profile:
        if device.type != "cuda":
            raise SystemExit("--profile: needs --device cuda (it reads the GPU's kernel timeline)")
        from torch.profiler import ProfilerActivity, profile
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    with prof if prof is not None else nullcontext():
        stats = runner.run("t2v", prompt, str(out_dir / "bench.mp4"), progress=False)
    per_chunk = stats["seconds_per_chunk"]
    W = cfg.sampler.window_size
    n = len(per_chunk)
    steady = per_chunk[1:n - W + 1] or per_chunk[1:] or per_chunk
    frames_per_chunk = stats["frames"] / n
    m = cfg.model
    h, w = cfg.video_size_h // 8, cfg.video_size_w // 8
    result.update({
        "line": describe_run(cfg, device, dtype), "size": f"{cfg.video_size_h}x{cfg.video_size_w}",
        "steps": cfg.sampler.num_steps, "window": W, "cfg": cfg.sampler.cfg_number, "distill": m.distill,
        "chunks": n, "steady_chunks": len(steady), "tokens/chunk": m.chunk_width * (h // 2) * (w // 2),
        "frames/chunk": frames_per_chunk, "forwards": stats["forwards"], "warmup_chunks": warm_chunks, "warmup_s": warm_s,
        "total_s": stats["seconds"], "first_chunk_s": per_chunk[0],
        "steady_s_per_chunk": statistics.mean(steady), "steady_video_fps": frames_per_chunk / statistics.mean(steady),
        "video_fps_all": stats["frames"] / stats["seconds"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0,
        "kv_peak_mib": stats["kv_cache"]["peak_bytes"] / 2 ** 20, "per_chunk_s": per_chunk,
    })
    if prof is not None:
        trace = Path(args.profile) / "trace.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
        result["profile"] = profile_summary(json.loads(trace.read_text())["traceEvents"], W, n)
        result["trace"] = str(trace)  # chrome://tracing or perfetto open it
    return result


# ----------------------------------------------------------------------------- profile summary
# Kernel kinds by name, first match wins (cuDNN / flash SDPA, the memory-efficient SDPA of the masked
# cross-attention, cuBLAS / CUTLASS GEMMs, Inductor's fused kernels, ATen copies, the rest).
KERNEL_KINDS = (
    ("self-attention (SDPA flash / cuDNN)", ("flash", "cudnn", "sdpa")),
    ("cross-attention (SDPA memory-efficient)", ("fmha", "mem_eff", "efficient_attention")),
    ("GEMM (cuBLAS / CUTLASS)", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "scaled_mm")),
    ("fused fp32 islands, fp8 quantisation (Inductor)", ("triton",)),
    ("copies (cat, index, repeat, contiguous)", ("copy", "cat", "index", "gather", "repeat", "memcpy", "memset")),
    ("other (LayerNorm, GELU, elementwise)", ("",)),
)
FORWARD = re.compile(r"magi_forward stage=(\d+) sub=(\d+) in=(\d+)")


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next(kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys))


def _union(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_summary(events: list[dict], window: int, chunks: int) -> dict:
    """The steady stages (window full: stages window .. chunks-1) of a chrome trace. A stage's kernels are those
    its forwards launched (matched by the launch's correlation id); its period runs from its first kernel to the
    next stage's first kernel. Per stage: period, busy time on the denoising stream, how far the host was ahead
    of the GPU when the stage's first kernel started, the kernel kinds, and the host's runtime calls that can
    wait (stream syncs, blocking copies, allocations)."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU kernels in the trace"}
    stream = collections.Counter(e.get("args", {}).get("stream") for e in gpu).most_common(1)[0][0]
    cpu_ranges, tid = {}, None
    for e in events:
        m = FORWARD.fullmatch(e.get("name", ""))
        if m and e.get("cat") == "user_annotation":
            cpu_ranges.setdefault(int(m[1]), []).append((e["ts"], e["ts"] + e["dur"]))
            tid = e.get("tid")
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("ph") == "X" and e.get("tid") == tid]
    by_corr = collections.defaultdict(list)
    for e in gpu:
        by_corr[e.get("args", {}).get("correlation")].append(e)
    main = sorted((e for e in gpu if e.get("args", {}).get("stream") == stream), key=lambda e: e["ts"])
    stages = []
    for s in sorted(cpu_ranges):
        rs = cpu_ranges[s]
        calls = [e for e in runtime if any(a <= e["ts"] < b for a, b in rs)]
        ks = [k for e in calls for k in by_corr.get(e.get("args", {}).get("correlation"), ())]
        if ks:
            stages.append({"stage": s, "cpu": (min(a for a, _ in rs), max(b for _, b in rs)), "calls": calls,
                           "first": min(k["ts"] for k in ks), "last": max(k["ts"] + k["dur"] for k in ks)})
    steady = [st for st, nxt in zip(stages, stages[1:]) if window <= st["stage"] < chunks]
    if not steady:
        return {"error": "no steady stage in the trace"}
    rows, kinds, waits, names = [], collections.Counter(), collections.Counter(), collections.Counter()
    for st, nxt in zip(stages, stages[1:]):
        if st not in steady:
            continue
        lo, hi = st["first"], nxt["first"]
        ks = [k for k in main if lo <= k["ts"] < hi]
        for k in ks:
            kinds[kernel_kind(k["name"])] += k["dur"]
            names[k["name"][:110]] += k["dur"]
        for e in st["calls"]:
            if any(w in e["name"] for w in ("Synchronize", "Memcpy", "HostAlloc", "Malloc", "Free")):
                waits[e["name"]] += 1
        rows.append({"stage": st["stage"], "period_ms": (hi - lo) / 1e3,
                     "busy_ms": _union((k["ts"], k["ts"] + k["dur"]) for k in ks) / 1e3,
                     "forwards_ms": (st["last"] - lo) / 1e3, "host_lead_ms": (lo - st["cpu"][0]) / 1e3,
                     "host_ms": (st["cpu"][1] - st["cpu"][0]) / 1e3})
    total = sum(kinds.values())
    return {"stages": rows, "kinds_ms_per_stage": {k: v / 1e3 / len(rows) for k, v in kinds.most_common()},
            "kinds_share": {k: v / total for k, v in kinds.most_common()},
            "gpu_idle_share": 1 - sum(r["busy_ms"] for r in rows) / sum(r["period_ms"] for r in rows),
            "host_calls_per_stage": {k: v / len(rows) for k, v in waits.most_common()},
            "top_kernels_ms_per_stage": {k: v / 1e3 / len(rows) for k, v in names.most_common(15)}}


def print_profile(p: dict) -> None:
    if "error" in p:
        print(f"profile: {p['error']}")
        return
    print("| steady stage (one chunk) | GPU period ms | GPU busy ms | its forwards' kernels ms | "
          "host ahead of the GPU ms | host time in the forwards ms |")
    print("|---|---|---|---|---|---|")
    for st in p["stages"]:
        print(f"| {st['stage']} | {st['period_ms']:.1f} | {st['busy_ms']:.1f} | {st['forwards_ms']:.1f} | "
              f"{st['host_lead_ms']:.1f} | {st['host_ms']:.1f} |")
    print(f"GPU idle inside the steady stages: {100 * p['gpu_idle_share']:.1f} %")
    print("| kernel kind | ms per steady chunk | share of kernel time |")
    print("|---|---|---|")
    for k, ms in p["kinds_ms_per_stage"].items():
        print(f"| {k} | {ms:.1f} | {100 * p['kinds_share'][k]:.1f} % |")
    print("| kernel (top 15 by time) | ms per steady chunk |")
    print("|---|---|")
    for k, ms in p["top_kernels_ms_per_stage"].items():
        print(f"| {k.replace('|', '/')} | {ms:.1f} |")
    calls = ", ".join(f"{k} {v:.1f}" for k, v in p["host_calls_per_stage"].items()) or "none"
    print(f"host runtime calls that can wait, per steady stage: {calls}")


def print_table(r: dict) -> None:
    rows = [("run", r["line"]), ("video size", r["size"]),
            ("steps / window / cfg", f"{r['steps']} / {r['window']} / {r['cfg']}{' (distilled)' if r['distill'] else ''}"),
            ("chunks (tokens each)", f"{r['chunks']} ({r['tokens/chunk']})"), ("forwards", r["forwards"]),
            (f"warm-up run s (untimed, {r['warmup_chunks']} chunks)", f"{r['warmup_s']:.1f}"),
            ("first chunk s (window fill)", f"{r['first_chunk_s']:.2f}"),
            (f"steady s / chunk (mean of {r['steady_chunks']})", f"{r['steady_s_per_chunk']:.3f}"),
            ("steady video frames / s", f"{r['steady_video_fps']:.2f}"),
            ("all chunks: total s, frames / s", f"{r['total_s']:.1f}, {r['video_fps_all']:.2f}"),
            ("peak GPU GiB", f"{r['peak_gpu_gib']:.1f}"), ("KV cache peak MiB", f"{r['kv_peak_mib']:.0f}"),
            ("s per chunk", " ".join(f"{s:.2f}" for s in r["per_chunk_s"]))]
    if "fp8_rel_error" in r:
        rows.append(("fp8 vs bf16, one window forward", f"rel. error {r['fp8_rel_error']:.4f}, finite {r['fp8_finite']}, "
                     f"attention {r['fp8_attention']}"))
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def main(argv=None) -> None:
    r = bench(parse_args(argv))
    print_table(r)
    if "profile" in r:
        print_profile(r["profile"])


if __name__ == "__main__":
    main()
