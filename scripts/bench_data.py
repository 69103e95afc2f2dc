"""Data pipeline throughput: samples/s of the raw and latent shard readers, with 0 and 2 reader workers, on a
fixed number of cores, next to the tiny model's training step.

    python scripts/bench_data.py [--cores 2] [--clips 48] [--height 64 --width 64 --frames 24] [--batch-size 4]

Builds a synthetic-world dataset in a temporary folder, packs it into raw shards (make_shards), encodes latent
shards (precompute, with the default small VAE and hash text encoder), then times each reader after its first
batch (worker start-up is printed separately). Reading is not the bottleneck when the latent reader delivers
more samples per second than the model step consumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.make_shards import make_shards  # noqa: E402
from data_tools.precompute import precompute  # noqa: E402
from data_tools.synthetic_world import WorldConfig, write_dataset  # noqa: E402
from magi_train.data import DataConfig, build_loader  # noqa: E402


def pin_cores(cores: int) -> str:
    if not hasattr(os, "sched_setaffinity"):
        return f"{os.cpu_count()} (no affinity control)"
    available = sorted(os.sched_getaffinity(0))
    chosen = set(available[:cores])
    os.sched_setaffinity(0, chosen)   # reader workers inherit it
    torch.set_num_threads(len(chosen))
    return f"{len(chosen)} of {len(available)}"


def time_loader(cfg: DataConfig, batches: int) -> dict:
    loader = build_loader(cfg)
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - t0
    samples, t1 = 0, time.perf_counter()
    for _ in range(batches):
        samples += len(next(it)["key"])
    elapsed = time.perf_counter() - t1
    shape = tuple((first["latent"] if cfg.kind == "latent" else first["video"]).shape)
    return {"samples_s": samples / elapsed, "startup_s": startup, "shape": shape}


# ---------------------------------------------------------------- MODEL STEP TIME
# The lead may replace this with the real training step (magi_train.train) once it exists; keep the return
# contract: seconds per optimizer step for one batch of the latent shape given, or None with a reason.
def model_step_seconds(latent_shape: tuple, text_len: int, text_dim: int, device: str, steps: int = 3
                       ) -> tuple[float | None, str]:
    try:
        from magi_train.config import model_preset
        from magi_train.model import build_dit
    except ImportError as e:
        return None, f"model not available ({e})"
    B, C, T, H, W = latent_shape
    try:
        cfg = model_preset("tiny", in_channels=C, out_channels=C, caption_channels=text_dim,
                           caption_max_length=max(text_len, 1))
        if T % cfg.chunk_width:
            return None, f"latent frames {T} not a multiple of chunk_width {cfg.chunk_width}"
        model = build_dit(cfg, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(latent_shape, device=device)
        n = T // cfg.chunk_width
        cap = torch.randn(B, text_len, text_dim, device=device)
        mask = torch.ones(B, text_len, dtype=torch.bool, device=device)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            t = torch.rand(B, n, device=device).sort(dim=1, descending=True).values
            loss = (model(x, t, cap, mask) - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return sum(times[1:]) / steps, f"tiny DiT fwd+bwd+AdamW on {device}, {params:.1f}M params"
    except Exception as e:   # the model API may still move; the data numbers stand on their own
        return None, f"model step failed: {type(e).__name__}: {e}"
# ---------------------------------------------------------------- END MODEL STEP TIME


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--fps", type=float, default=12.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=24, help="timed batches per reader")
    ap.add_argument("--workdir", default=None, help="keep the dataset here (default: a temporary folder)")
    ap.add_argument("--model-device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the tiny model's step is timed (training's default device)")
    a = ap.parse_args(argv)
    cores = pin_cores(a.cores)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir or tmp)
        world = WorldConfig(height=a.height, width=a.width, num_frames=a.frames, fps=a.fps)
        t0 = time.perf_counter()
        write_dataset(root / "src", a.clips, world, seed=0, progress=False)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        make_shards(root / "src", root / "raw", max_samples_per_shard=16, progress=False, overwrite=True)
        t_shard = time.perf_counter() - t0

        from magi_train.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae
        torch.manual_seed(0)
        vae, text = build_vae(VAEConfig()), build_text_encoder(TextEncoderConfig())
        t0 = time.perf_counter()
        precompute(root / "raw", root / "latent", vae, text, rank=0, world_size=1, progress=False)
        t_pre = time.perf_counter() - t0

        rows = []
        for kind in ("raw", "latent"):
            for workers in (0, 2):
                cfg = DataConfig(kind=kind, shards=str(root / kind), batch_size=a.batch_size, num_workers=workers,
                                 shuffle_buffer=16)
                rows.append((kind, workers, time_loader(cfg, a.batches)))
        latent_shape = rows[-1][2]["shape"]
        step, note = model_step_seconds(latent_shape, text.max_length, text.dim, a.model_device)

    print(f"\nbench_data: {a.clips} clips {a.height}x{a.width}x{a.frames} @ {a.fps:g} fps, batch {a.batch_size}, "
          f"cores {cores}, torch threads {torch.get_num_threads()}")
    print(f"prepare: generate {a.clips / t_gen:.1f} clips/s, make_shards {a.clips / t_shard:.1f} videos/s, "
          f"precompute {a.clips / t_pre:.1f} samples/s (small VAE + hash text, CPU)")
    print(f"\n| reader | workers | samples/s | first batch s | batch shape |")
    print(f"|---|---|---|---|---|")
    for kind, workers, r in rows:
        print(f"| {kind} | {workers} | {r['samples_s']:.1f} | {r['startup_s']:.2f} | {list(r['shape'])} |")
    if step is None:
        print(f"\nmodel step: n/a ({note})")
        return
    model_rate = a.batch_size / step
    print(f"\nmodel step: {step * 1000:.0f} ms per batch of {a.batch_size} = {model_rate:.1f} samples/s ({note}, "
          f"latent {list(latent_shape)})")
    latent_best = max(r["samples_s"] for kind, _, r in rows if kind == "latent")
    verdict = "reading is NOT the bottleneck" if latent_best > model_rate else "READING IS THE BOTTLENECK"
    print(f"latent reader / model: {latent_best / model_rate:.1f}x -> {verdict}")


if __name__ == "__main__":
    main()
