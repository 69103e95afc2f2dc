"""Inference speed through the CLI's own pipeline (MagiRunner: text encoder, DiT window loop, VAE decode on a second
thread, streamed mp4), random weights: first-chunk latency and the steady rate with the window full.

  python scripts/bench_infer.py                                   # tiny model on the CPU
  python scripts/bench_infer.py --model 4.5B --height 480 --width 848 --num_steps 8 --window_size 4 \
      --distill --num_chunks 12 [--fp8] [--compile off]
  python scripts/bench_infer.py --config_file configs/infer/4.5B_base.json --height 480 --width 848 ...

Steady state: a chunk leaves the window every num_steps / window_size forwards; the chunks finished while the
window is full (chunks 1 .. n - window_size) each take one such stage, the first also waits for the window to
fill (and, cold, for torch.compile: a warm-up run first takes that out). A chunk counts as done when its decoded
pixels are on the host. Left out: the real T5 (the hash encoder stands in: text is encoded once per prompt) and
the MAGI-1 VAE (an untrained small VAE decodes, overlapped with denoising either way). Random weights include the
final projection (zero at init), so the velocities are not 0. --fp8 quantises the blocks to the MAGI-1 fp8 format
(quantize_to_magi_fp8, weights-only scales) and first compares one window forward with bf16."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from magi_infer.config import load_infer_config
from magi_infer.runner import MagiRunner, build_model, describe_run, resolve_device, resolve_dtype


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
    p.add_argument("--warmup_chunks", type=int, default=1,
                   help="untimed run of this many chunks first (compile, kernel selection); 0: none")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
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
    ref = model(x, t, cap, mask, None, dt).float()
    load_magi_state_dict(model, quantize_to_magi_fp8(model))
    out = model(x, t, cap, mask, None, dt).float()
    return {"fp8_rel_error": float((out - ref).norm() / ref.norm()), "fp8_finite": bool(torch.isfinite(out).all())}


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = infer_config(args, args.num_chunks)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    print(describe_run(cfg, device, dtype), flush=True)
    torch.manual_seed(0)
    model = build_model(cfg, device, dtype)
    torch.nn.init.normal_(model.final_linear.linear.weight, std=0.02)  # random weights: v is not 0
    result = fp8_error(model, cfg, device) if args.fp8 else {}
    runner = MagiRunner(cfg, model=model)
    prompt = ["a red ball bounces across a wooden floor"]
    out_dir = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    warm_s = 0.0
    if args.warmup_chunks:
        start = time.perf_counter()
        warm_cfg = infer_config(args, args.warmup_chunks)
        MagiRunner(warm_cfg, model=model, text_encoder=runner.text_encoder, vae=runner.vae).run(
            "t2v", prompt, str(out_dir / "warmup.mp4"), progress=False)
        warm_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
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
        "frames/chunk": frames_per_chunk, "forwards": stats["forwards"], "warmup_s": warm_s,
        "total_s": stats["seconds"], "first_chunk_s": per_chunk[0],
        "steady_s_per_chunk": statistics.mean(steady), "steady_video_fps": frames_per_chunk / statistics.mean(steady),
        "video_fps_all": stats["frames"] / stats["seconds"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else 0.0,
        "kv_peak_mib": stats["kv_cache"]["peak_bytes"] / 2 ** 20, "per_chunk_s": per_chunk,
    })
    return result


def print_table(r: dict) -> None:
    rows = [("run", r["line"]), ("video size", r["size"]),
            ("steps / window / cfg", f"{r['steps']} / {r['window']} / {r['cfg']}{' (distilled)' if r['distill'] else ''}"),
            ("chunks (tokens each)", f"{r['chunks']} ({r['tokens/chunk']})"), ("forwards", r["forwards"]),
            ("warm-up run s (untimed)", f"{r['warmup_s']:.1f}"),
            ("first chunk s (window fill)", f"{r['first_chunk_s']:.2f}"),
            (f"steady s / chunk (mean of {r['steady_chunks']})", f"{r['steady_s_per_chunk']:.3f}"),
            ("steady video frames / s", f"{r['steady_video_fps']:.2f}"),
            ("all chunks: total s, frames / s", f"{r['total_s']:.1f}, {r['video_fps_all']:.2f}"),
            ("peak GPU GiB", f"{r['peak_gpu_gib']:.1f}"), ("KV cache peak MiB", f"{r['kv_peak_mib']:.0f}"),
            ("s per chunk", " ".join(f"{s:.2f}" for s in r["per_chunk_s"]))]
    if "fp8_rel_error" in r:
        rows.append(("fp8 vs bf16, one window forward", f"rel. error {r['fp8_rel_error']:.4f}, finite {r['fp8_finite']}"))
    width = max(len(k) for k, _ in rows)
    print("| " + "metric".ljust(width) + " | value |")
    print("|-" + "-" * width + "-|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


def main(argv=None) -> None:
    print_table(bench(parse_args(argv)))


if __name__ == "__main__":
    main()
