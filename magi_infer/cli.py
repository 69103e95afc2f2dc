"""python -m magi_infer --config_file FILE --mode t2v|i2v|v2v --prompt ... --output_path OUT [key=value ...]

Accepts MAGI-1's example json configs (and our yaml, configs/infer/), MAGI-1's run-time keys as hydra-style
overrides (num_steps=12 window_size=4 model.num_layers=2 ...), repeated --prompt with --prompt_start_chunks for
chunk-wise prompts (--prompt A --prompt B --prompt_start_chunks 0,3). torchrun with cp_size / tp_size / pp_size > 1 runs the parallel layouts. Bad input exits with one line."""
from __future__ import annotations

import argparse
import json
import sys

from magi_train.config import ConfigError

from .config import MODES, load_infer_config


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,3, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m magi_infer", description="MAGI-1 video generation, streamed chunk by chunk.")
    p.add_argument("--config_file", help="MAGI-1 example json, flat json or configs/infer/*.yaml")
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt; repeat for chunk-wise prompts (see --prompt_start_chunks)")
    p.add_argument("--prompt_start_chunks", type=_int_list,
                   help="comma-separated chunk where each prompt starts, e.g. 0,3 (default: prompt k at chunk k)")
    p.add_argument("--image_path", help="i2v: the first frame")
    p.add_argument("--prefix_video_path", help="v2v: the video to continue")
    p.add_argument("--output_path", required=True, help="mp4, written while it is generated")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--stats_json", help="write timing stats here")
    p.add_argument("overrides", nargs="*", help="key=value (MAGI-1 run-time keys, model.*, sampler.*)")
    return p.parse_intermixed_args(argv)


def run(args: argparse.Namespace) -> dict | None:
    from .distributed import needs_parallel, setup_parallel
    from .model_build import build_inference_dit
    from .runner import describe_run, resolve_device, resolve_dtype

    cfg = load_infer_config(args.config_file, args.overrides)
    model, rank, env = None, 0, None
    if needs_parallel(cfg):
        env = setup_parallel(cfg)
        rank = env.rank
        if cfg.device == "auto":
            cfg.device = str(env.device)
    device = resolve_device(cfg)
    if rank == 0:  # the first line says what runs
        print(describe_run(cfg, device, resolve_dtype(cfg, device)), flush=True)
    if env is not None:
        model = build_inference_dit(cfg, env, resolve_dtype(cfg, env.device))
    try:
        return _generate(args, cfg, model, rank)
    finally:
        if env is not None:
            from magi_train.parallel.env import destroy_parallel

            destroy_parallel(env)


def _generate(args, cfg, model, rank) -> dict | None:
    from .runner import MagiRunner

    runner = MagiRunner(cfg, model=model)
    kwargs = dict(starts=args.prompt_start_chunks, image_path=args.image_path,
                  prefix_video_path=args.prefix_video_path)
    if rank != 0:  # every rank takes part in the forwards; rank 0 decodes and writes
        for _ in runner.generator(args.mode, args.prompt, **kwargs):
            pass
        return None
    stats = runner.run(args.mode, args.prompt, args.output_path, progress=not args.no_progress, **kwargs)
    print(f"wrote {stats['output_path']}: {stats['frames']} frames, {stats['chunks']} chunks in "
          f"{stats['seconds']:.1f}s ({stats['frames_per_second']:.2f} frames/s)")
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    return stats


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
