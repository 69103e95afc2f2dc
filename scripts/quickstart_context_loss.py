#!/usr/bin/env python
"""How much a quickstart model uses its context: the velocity loss of the first noisy chunk of held-out clips at
fixed t, with the chunks before it clean (as V2V gives them) against the same chunks replaced by pure noise, and
the loss of copying the last context frame over the chunk (at t = 0 the loss is the error of predicting the
chunk from the context alone, in units of the latent's variance). Prints a table (docs/quickstart.md).

    python scripts/quickstart_context_loss.py [--run-dir runs/quickstart] [--batches 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

T_VALUES = (0.0, 0.05, 0.2, 0.5, 0.8)


def first_chunk_loss(model, batch: dict, context: int, t: float, chunk_width: int, clean_t: float,
                     noisy_context: bool) -> float:
    x1 = batch["latent"].float()
    B, n = x1.shape[0], context + 1
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    span = slice(context * chunk_width, n * chunk_width)
    x = x1[:, :, :n * chunk_width].clone()
    times = torch.full((B, n), clean_t)
    if noisy_context:
        times[:, :context] = 0.0
        x[:, :, :span.start] = noise[:, :, :span.start]
    times[:, context] = t
    x[:, :, span] = t * x1[:, :, span] + (1 - t) * noise[:, :, span]
    dropped = torch.zeros(B, n, dtype=torch.bool)
    dropped[:, :context] = not noisy_context        # clean context sees the null caption, as inference caches it
    with torch.no_grad():
        v = model(x, times, batch["text_emb"].float(), batch["text_mask"].bool(), dropped)
    return (v[:, :, span] - (x1[:, :, span] - noise[:, :, span])).square().mean().item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/quickstart")
    ap.add_argument("--batches", type=int, default=2, help="held-out batches of 8 clips")
    args = ap.parse_args(argv)
    run = Path(args.run_dir).resolve()
    torch.set_num_threads(1)

    from magi_infer.config import load_infer_config
    from magi_infer.distributed import single_process_env
    from magi_infer.model_build import build_inference_dit
    from magi_train.training.build import build_validation_batches
    from magi_train.training.config_loading import load_config

    infer = load_infer_config(str(run / "infer.json"))
    model = build_inference_dit(infer, single_process_env(torch.device("cpu")), torch.float32)
    cfg = load_config(["experiment=quickstart", f"data.shards={run / 'shards' / 'latent_train'}",
                       f"data.val_shards={run / 'shards' / 'latent_val'}", "data.batch_size=8"])
    batches = build_validation_batches(cfg, args.batches)
    cw, clean_t = cfg.model.chunk_width, cfg.train.flow.clean_t
    print("| context | " + " | ".join(f"t = {t:g}" for t in T_VALUES) + " | copy last frame |")
    print("|---" * (len(T_VALUES) + 2) + "|")
    for context in range(1, cfg.data.num_frames // cw):
        for noisy in (False, True):
            losses = [sum(first_chunk_loss(model, b, context, t, cw, clean_t, noisy) for b in batches) / len(batches)
                      for t in T_VALUES]
            copy = sum((b["latent"][:, :, context * cw:(context + 1) * cw].float()
                        - b["latent"][:, :, context * cw - 1:context * cw].float()).square().mean().item()
                       for b in batches) / len(batches)
            label = f"{context} chunk(s) {'replaced by noise' if noisy else 'clean'}"
            print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in losses) + f" | {'' if noisy else f'{copy:.3f}'} |")


if __name__ == "__main__":
    main()
