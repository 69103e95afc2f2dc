"""Evaluate a world model on held-out synthetic clips: continue each clip from its first frames (V2V) and score
the continuation against the truth: per-frame PSNR/SSIM and object trajectory error (centroids tracked from
pixels vs the ground-truth json), next to the copy-last-frame baseline and to ground truth (the tracker's floor).

    python -m magi_train.evaluate --config_file runs/quickstart/infer.json --clips runs/quickstart/world/val \
        --prefix_frames 12 --num_frames 12 --out runs/quickstart/eval [key=value ...]

Writes scores.csv (per clip and method), per_frame.csv, summary.json and error_vs_time.png to --out, and prints
the table. This entry point drives the inference pipeline (magi_infer); the training library does not import it.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from magi_train.data.video_codec import read_video, write_video
from magi_train.evaluation.continuation import copy_last_frame, score_continuation

METHODS = ("model", "copy_last_frame", "ground_truth")


def held_out_clips(folder: str | Path, limit: int) -> list[Path]:
    clips = sorted(p for p in Path(folder).glob("*.mp4") if p.with_suffix(".json").exists())
    if not clips:
        raise FileNotFoundError(f"clips: no *.mp4 with a trajectory .json beside it in {folder}")
    return clips[:limit]


def continue_clip(runner, clip: Path, caption: str, num_frames: int) -> np.ndarray:
    gen = runner.generator("v2v", [caption], prefix_video_path=str(clip))
    frames = np.concatenate([pixels for _, pixels in runner.frames(gen)])
    return frames[:num_frames]


def plot(per_frame: dict[str, dict[str, np.ndarray]], fps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (metric, label) in zip(axes, [("traj_err", "trajectory error (px)"), ("psnr", "PSNR (dB)"),
                                          ("ssim", "SSIM")]):
        for method, series in per_frame.items():
            y = series[metric]
            if metric == "psnr":
                y = np.minimum(y, 60)  # ground truth is exact (PSNR 100): keep the axis readable
            ax.plot(np.arange(1, len(y) + 1) / fps, y, marker="o", ms=3, label=method)
        ax.set_xlabel("seconds into the future")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    tmp.replace(path)


def evaluate(runner, clips: list[Path], prefix_frames: int, num_frames: int, out: Path, fps: float,
             videos: int = 2, progress: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    per_clip, series = [], {m: [] for m in METHODS}
    for i, clip in enumerate(tqdm(clips, desc="evaluate v2v", unit="clip", disable=not progress)):
        frames, _ = read_video(clip)
        traj = json.loads(clip.with_suffix(".json").read_text())
        caption = clip.with_suffix(".txt").read_text().strip() if clip.with_suffix(".txt").exists() else ""
        truth = frames[prefix_frames:prefix_frames + num_frames]
        if len(truth) < num_frames:
            raise ValueError(f"clips: {clip.name} has {len(frames)} frames, needs prefix_frames + num_frames = "
                             f"{prefix_frames + num_frames}")
        pred = continue_clip(runner, clip, caption, num_frames)
        preds = {"model": pred, "copy_last_frame": copy_last_frame(frames[:prefix_frames], num_frames),
                 "ground_truth": truth}
        for method, p in preds.items():
            s = score_continuation(p, truth, traj, first_frame=prefix_frames)
            series[method].append(s)
            per_clip.append([clip.stem, method, *(f"{v:.4f}" for v in s.summary().values())])
        if i < videos:  # side by side: truth | model | copy-last-frame, after the shared prefix
            strip = np.concatenate([truth, pred, preds["copy_last_frame"]], axis=2)
            full = np.concatenate([np.concatenate([frames[:prefix_frames]] * 3, axis=2), strip])
            write_video(out / f"v2v_{clip.stem}_truth_model_copy.mp4", full, fps)
    per_frame = {m: {k: np.nanmean(np.stack([getattr(s, k) for s in v]), axis=0) for k in ("psnr", "ssim", "traj_err")}
                 for m, v in series.items()}
    summary = {m: {k: float(np.nanmean(per_frame[m][k])) for k in ("psnr", "ssim", "traj_err")} for m in METHODS}
    model_err, copy_err = summary["model"]["traj_err"], summary["copy_last_frame"]["traj_err"]
    summary["trajectory_gain_vs_copy"] = float(copy_err / model_err) if model_err > 0 else float("inf")
    summary["clips"] = len(clips)
    _write_csv(out / "scores.csv", ["clip", "method", "psnr", "ssim", "traj_err_px"], per_clip)
    _write_csv(out / "per_frame.csv", ["method", "future_frame", "psnr", "ssim", "traj_err_px"],
               [[m, f + 1, *(f"{per_frame[m][k][f]:.4f}" for k in ("psnr", "ssim", "traj_err"))]
                for m in METHODS for f in range(num_frames)])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(per_frame, fps, out / "error_vs_time.png")
    return summary


def format_table(summary: dict) -> str:
    lines = ["| method | PSNR dB | SSIM | trajectory error px |", "|---|---|---|---|"]
    for m in METHODS:
        s = summary[m]
        psnr = "exact" if s["psnr"] >= 100 else f"{s['psnr']:.2f}"
        lines.append(f"| {m} | {psnr} | {s['ssim']:.3f} | {s['traj_err']:.2f} |")
    lines.append(f"copy-last-frame / model trajectory error: {summary['trajectory_gain_vs_copy']:.2f}x "
                 f"over {summary['clips']} held-out clips")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config_file", required=True, help="inference config (MAGI-1 json or our yaml)")
    ap.add_argument("--clips", required=True, help="folder of held-out clips (mp4 + trajectory json + caption txt)")
    ap.add_argument("--prefix_frames", type=int, default=12)
    ap.add_argument("--num_frames", type=int, default=12, help="frames to predict after the prefix")
    ap.add_argument("--max_clips", type=int, default=16)
    ap.add_argument("--videos", type=int, default=2, help="side-by-side mp4s written for the first clips")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="run-time keys key=value (as magi_infer)")
    args = ap.parse_args(argv)
    try:
        from magi_infer.config import load_infer_config
        from magi_infer.runner import MagiRunner

        cfg = load_infer_config(args.config_file, list(args.overrides) + [
            f"prefix_frames={args.prefix_frames}", f"num_frames={args.num_frames}"])
        runner = MagiRunner(cfg)
        clips = held_out_clips(args.clips, args.max_clips)
        summary = evaluate(runner, clips, args.prefix_frames, args.num_frames, Path(args.out), cfg.fps, args.videos)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"wrote {args.out}/scores.csv, per_frame.csv, summary.json, error_vs_time.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
