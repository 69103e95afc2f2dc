"""Inference speed of the chunk pipeline with random weights: seconds per chunk and video frames per second.

  python scripts/bench_infer.py                                   # tiny model on the CPU
  python scripts/bench_infer.py --model 4.5B --height 480 --width 848 --device cuda --dtype bfloat16 \
      --num_chunks 4 --num_steps 16

Latent space only (no text encoder or VAE: their cost is per prompt / per chunk and small next to the DiT's).
A chunk leaves the window every num_steps / window_size forwards once the window is full; the first chunk
also waits for the window to fill, so the table gives both the first-chunk latency and the steady rate."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from magi_infer.conditioning import Conditioning
from magi_infer.config import SamplerConfig
from magi_infer.pipeline import ChunkGenerator
from magi_train.config import model_preset
from magi_train.dtypes import DTYPES
from magi_train.model import build_dit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset: tiny, debug, 4.5B, 24B")
    p.add_argument("--height", type=int, default=64, help="video height (pixels; latent = /8)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--num_chunks", type=int, default=4)
    p.add_argument("--num_steps", type=int, default=8)
    p.add_argument("--window_size", type=int, default=4)
    p.add_argument("--cfg_number", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--distill", action="store_true", help="step-size conditioned model (implies --cfg_number 1)")
    p.add_argument("--chunk_width", type=int, default=6, help="latent frames per chunk (MAGI-1: 6)")
    p.add_argument("--attention_backend", default=None, help="default: sdpa_chunked on cuda, reference on cpu")
    p.add_argument("--kv_offload", action="store_true")
    p.add_argument("--noise2clean_kvrange", default="5,4,3,2", help="comma list; empty for full history")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first (kernel selection, allocator)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    return p.parse_args(argv)


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    backend = args.attention_backend or ("sdpa_chunked" if device.type == "cuda" else "reference")
    cfg = model_preset(args.model, chunk_width=args.chunk_width, attention_backend=backend, distill=args.distill,
                       params_dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    torch.manual_seed(0)
    model = build_dit(cfg, device=device, dtype=dtype).eval()
    ranges = [int(r) for r in args.noise2clean_kvrange.split(",") if r]
    while ranges and args.num_steps % len(ranges):
        ranges = ranges[1:]   # keep the nearest ranges that divide num_steps
    sampler = SamplerConfig(num_steps=args.num_steps, window_size=args.window_size,
                            cfg_number=1 if args.distill else args.cfg_number, noise2clean_kvrange=ranges,
                            kv_offload=args.kv_offload)
    h, w = args.height // 8, args.width // 8
    L = cfg.caption_max_length
    g = torch.Generator().manual_seed(0)
    caption = torch.randn(1, args.num_chunks, L, cfg.caption_channels, generator=g) * 0.1
    mask = torch.zeros(1, args.num_chunks, L, dtype=torch.bool)
    mask[..., : min(L, 64)] = True
    cond = Conditioning(caption.to(device), mask.to(device))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if args.warmup:
        warm = ChunkGenerator(model, sampler, cond, args.num_chunks, (h, w), seed=1, device=device)
        for i in range(min(args.warmup, len(warm.schedule))):
            warm.step(i)
        del warm
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = ChunkGenerator(model, sampler, cond, args.num_chunks, (h, w), seed=0, device=device)
    sync()
    start = last = time.perf_counter()
    per_chunk = []
    for _ in gen:
        sync()
        now = time.perf_counter()
        per_chunk.append(now - last)
        last = now
    total = last - start
    frames_per_chunk = args.chunk_width * 4
    steady = per_chunk[1:] or per_chunk
    return {
        "model": args.model, "size": f"{args.height}x{args.width}", "device": str(device), "dtype": str(dtype)[6:],
        "attention": backend, "steps": args.num_steps, "window": args.window_size, "cfg": sampler.cfg_number,
        "chunks": args.num_chunks, "tokens/chunk": args.chunk_width * (h // 2) * (w // 2),
        "forwards": gen.forwards, "total_s": total, "first_chunk_s": per_chunk[0],
        "steady_s_per_chunk": statistics.mean(steady), "mean_s_per_chunk": total / len(per_chunk),
        "video_fps": frames_per_chunk * len(per_chunk) / total, "steady_video_fps": frames_per_chunk / statistics.mean(steady),
        "forward_ms": 1000 * total / gen.forwards,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0,
        "kv_peak_mib": gen.cache.peak_bytes / 2 ** 20, "per_chunk_s": per_chunk,
    }


def print_table(r: dict) -> None:
    rows = [("model", r["model"]), ("video size", r["size"]), ("device / dtype", f"{r['device']} / {r['dtype']}"),
            ("attention backend", r["attention"]), ("steps / window / cfg", f"{r['steps']} / {r['window']} / {r['cfg']}"),
            ("chunks (tokens each)", f"{r['chunks']} ({r['tokens/chunk']})"), ("forwards", r["forwards"]),
            ("total s", f"{r['total_s']:.2f}"), ("first chunk s (window fill)", f"{r['first_chunk_s']:.2f}"),
            ("steady s / chunk", f"{r['steady_s_per_chunk']:.2f}"), ("mean s / chunk", f"{r['mean_s_per_chunk']:.2f}"),
            ("video frames / s (all)", f"{r['video_fps']:.3f}"), ("video frames / s (steady)", f"{r['steady_video_fps']:.3f}"),
            ("ms / forward (all passes)", f"{r['forward_ms']:.1f}"), ("peak GPU GiB", f"{r['peak_gpu_gib']:.1f}"),
            ("KV cache peak MiB", f"{r['kv_peak_mib']:.1f}"),
            ("s per chunk", " ".join(f"{s:.2f}" for s in r["per_chunk_s"]))]
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def main(argv=None) -> None:
    print_table(bench(parse_args(argv)))


if __name__ == "__main__":
    main()
