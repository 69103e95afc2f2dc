"""Train the small video VAE on a folder of videos, webdataset shards, or the synthetic world.

    python scripts/train_vae.py --data DIR_OR_SHARDS --out DIR --steps N
    python scripts/train_vae.py --synthetic 256 --out runs/vae --max-seconds 90
Prints the held-out PSNR; the model loads with build_vae(VAEConfig(kind="small", path=DIR)).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from magi_train.encoders.vae_training import VAETrainConfig, train_vae


def parse_args(argv: list[str] | None = None) -> VAETrainConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = {f.name: f for f in fields(VAETrainConfig)}
    ap.add_argument("--out", required=True)
    for name, f in defaults.items():
        if name in ("out", "progress"):
            continue
        flag = "--" + name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true")
            continue
        kind = {"int": int, "float": float}.get(str(f.type).replace("Optional[", "").rstrip("]"), str)
        ap.add_argument(flag, type=kind, default=f.default)
    ap.add_argument("--no-progress", action="store_true")
    args = vars(ap.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    return VAETrainConfig(**args)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    metrics = train_vae(cfg)
    print(json.dumps(metrics))
    print(f"held-out PSNR {metrics['held_out_psnr']:.2f} dB over {metrics['held_out_clips']} clips; saved to {cfg.out}")


if __name__ == "__main__":
    main()
