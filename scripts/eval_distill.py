#!/usr/bin/env python
"""V2V table of a distilled student against its teacher, through magi_infer (the path users serve):

  teacher    base model, 64 steps, cfg 3           (the reference the student was distilled from)
  base_8     base model, 8 steps, cfg 3            (the undistilled model at the student's budget)
  student_8  distilled model, 8 steps, cfg 1
  student_12 distilled model, 12-step shortcut "8,16,16", cfg 1

    python scripts/eval_distill.py --config_file runs/qs/infer.json --base runs/qs/base/export/step_00000600 \
        --student runs/qs/distill/export/step_00000300 --clips runs/qs/world/val --max_clips 8

Per setting: window forwards per generated chunk (ChunkGenerator.forwards) and network calls per chunk (every
DiT call: the cfg-3 passes, the nearly-clean extra pass, prefill), wall time per clip (CPU, after one warm-up
clip), V2V scores against the true continuation (PSNR, SSIM, trajectory error: magi_train.evaluation) and the
distance to the teacher's own continuation: relative L2 error of the generated latents ||z - z_teacher|| / ||z_teacher||
(independent of the VAE) and PSNR / SSIM of the decoded frames against the teacher's. Every setting continues every clip from
the same noise (the config's seed). Prints a markdown table."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from magi_train.data.video_codec import read_video, write_video
from magi_train.evaluation.continuation import score_continuation
from magi_train.evaluation.image_metrics import psnr_per_frame, ssim_per_frame


def settings(base: str, student: str, student_keys: list[str], fit: bool = False) -> dict[str, list[str]]:
    s = student_keys
    fit_row = {"student, 64 steps, cfg 1 (its fit of the guided teacher)":
               [f"load={student}", "distill=true", "num_steps=64", "cfg_number=1", *s]} if fit else {}
    return {
        "teacher (base, 64 steps, cfg 3)": [f"load={base}", "num_steps=64", "cfg_number=3"],
        "base, 8 steps, cfg 3": [f"load={base}", "num_steps=8", "cfg_number=3"],
        "student, 8 steps, cfg 1": [f"load={student}", "distill=true", "num_steps=8", "cfg_number=1", *s],
        "student, 12-step shortcut 8,16,16, cfg 1": [f"load={student}", "distill=true", "num_steps=12",
                                                      "shortcut_mode=8,16,16", "cfg_number=1", *s],
        **fit_row,
    }


def run_setting(config_file: str, overrides: list[str], clips: list[Path], prefix: int, future: int):
    import torch

    from magi_infer.config import load_infer_config
    from magi_infer.runner import MagiRunner

    cfg = load_infer_config(config_file, [*overrides, f"prefix_frames={prefix}", f"num_frames={future}"])
    runner = MagiRunner(cfg)
    calls = [0]
    hook = runner.model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    preds, latents, times, fwd, net = [], [], [], [], []
    try:
        for i, clip in enumerate([clips[0], *clips]):        # the first clip twice: warm-up, not timed
            caption = clip.with_suffix(".txt").read_text().strip()
            calls[0] = 0
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = runner.generator("v2v", [caption], prefix_video_path=str(clip))
                chunks, pixels = zip(*runner.frames(gen))
                frames = np.concatenate(pixels)[:future]
                latent = torch.cat([c.latent.float().cpu() for c in chunks], 2).numpy()
            if i == 0:
                continue
            times.append(time.perf_counter() - t0)
            fwd.append(gen.forwards / gen.num_generated_chunks)
            net.append(calls[0] / gen.num_generated_chunks)
            preds.append(frames)
            latents.append(latent)
    finally:
        hook.remove()
    return preds, latents, float(np.mean(times)), float(np.mean(fwd)), float(np.mean(net))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config_file", required=True)
    ap.add_argument("--base", required=True, help="export of the base (teacher) model")
    ap.add_argument("--student", required=True, help="export of the distilled student (holds inference_weight.distill)")
    ap.add_argument("--clips", required=True)
    ap.add_argument("--max_clips", type=int, default=8)
    ap.add_argument("--prefix_frames", type=int, default=12)
    ap.add_argument("--num_frames", type=int, default=12)
    ap.add_argument("--out", default=None, help="folder for summary.json and a side-by-side mp4 of the first clip")
    ap.add_argument("--cache", default=None, help="folder keeping each setting's continuations (rerun only what is new)")
    ap.add_argument("--student_keys", nargs="*", default=[], help="run-time keys for the student settings only "
                    "(e.g. distill_nearly_clean_chunk_threshold=1.0: no nearly-clean extra pass)")
    ap.add_argument("--only", type=int, default=None, help="run the first ONLY settings (e.g. 2: teacher and base)")
    ap.add_argument("--fit", action="store_true", help="add the student at 64 steps (its fit of the guided teacher: "
                    "the floor of its error at any budget)")
    args = ap.parse_args(argv)
    clips = sorted(p for p in Path(args.clips).glob("*.mp4") if p.with_suffix(".json").exists())[: args.max_clips]
    if not clips:
        print(f"error: clips: no *.mp4 with a trajectory .json in {args.clips}", file=sys.stderr)
        return 2
    P, F = args.prefix_frames, args.num_frames
    results, teacher = {}, None
    for k, (name, overrides) in enumerate(settings(args.base, args.student, args.student_keys, args.fit).items()):
        if args.only is not None and k >= args.only:
            break
        # a setting's continuations are keyed by what makes them: its keys (weights included), the clips, the config
        key = json.dumps([args.config_file, overrides, [str(c) for c in clips], P, F])
        tag = f"setting{k}_{len(clips)}clips_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        cached = Path(args.cache) / f"{tag}.npz" if args.cache else None
        if cached is not None and cached.exists():
            z = np.load(cached)
            preds, latents, (sec, fwd, net) = list(z["preds"]), list(z["latents"]), z["stats"].tolist()
        else:
            preds, latents, sec, fwd, net = run_setting(args.config_file, overrides, clips, P, F)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, preds=np.stack(preds), latents=np.stack(latents), stats=np.array([sec, fwd, net]))
        teacher = (preds, latents) if teacher is None else teacher
        scores = {"psnr": [], "ssim": [], "traj": [], "psnr_t": [], "ssim_t": [], "lat_t": []}
        for clip, pred, ref, lat, lat_ref in zip(clips, preds, teacher[0], latents, teacher[1], strict=True):
            frames, _ = read_video(clip)
            s = score_continuation(pred, frames[P:P + F], json.loads(clip.with_suffix(".json").read_text()), P)
            scores["psnr"].append(np.nanmean(s.psnr))
            scores["ssim"].append(np.nanmean(s.ssim))
            scores["traj"].append(np.nanmean(s.traj_err))
            scores["psnr_t"].append(np.mean(np.minimum(psnr_per_frame(pred, ref), 100.0)))
            scores["ssim_t"].append(np.mean(ssim_per_frame(pred, ref)))
            scores["lat_t"].append(float(np.linalg.norm(lat - lat_ref) / np.linalg.norm(lat_ref)))
        results[name] = dict(fwd=fwd, net=net, sec=sec, **{k: float(np.nanmean(v)) for k, v in scores.items()},
                             first=preds[0])
        print(f"[eval_distill] {name}: done", flush=True)
    print(f"{len(clips)} held-out clips, {P} prefix frames -> {F} predicted frames (V2V)")
    print("| setting | window forwards / chunk | network calls / chunk | s / clip | PSNR dB | SSIM | trajectory "
          "error px | latent error vs teacher | PSNR vs teacher dB | SSIM vs teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        vs = "(reference)" if name.startswith("teacher") else f"{r['psnr_t']:.2f}"
        vs_s = "(reference)" if name.startswith("teacher") else f"{r['ssim_t']:.3f}"
        vs_l = "(reference)" if name.startswith("teacher") else f"{r['lat_t']:.4f}"
        print(f"| {name} | {r['fwd']:.1f} | {r['net']:.1f} | {r['sec']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
              f"{r['traj']:.2f} | {vs_l} | {vs} | {vs_s} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(
            {n: {k: v for k, v in r.items() if k != "first"} for n, r in results.items()}, indent=1))
        frames, fps = read_video(clips[0])
        strip = np.concatenate([frames[P:P + F], *[r["first"] for r in results.values()]], axis=2)
        write_video(out / f"v2v_{clips[0].stem}_truth_teacher_base8_student8_student12.mp4", strip, fps)
        from PIL import Image

        Image.fromarray(np.concatenate(list(strip[::3]), axis=0)).save(out / f"v2v_{clips[0].stem}_frames.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
