"""The sweep's summary from its complete cells: results.csv and results.md (one row per cell: checkpoint, its
training step, the sampler settings, every metric as mean and 95% interval over clips, forwards and seconds per
chunk, frames per second), plots (metric vs num_steps per checkpoint, metric vs training step, quality vs seconds
per chunk with its Pareto front) and grid.mp4 / grid.png (one row per cell, the same clip; truth on top).

    python -m magi_eval.aggregate SWEEP_DIR [--quality psnr]

Runs by itself at the end of every sweep; run it by hand on a sweep whose cells ran elsewhere (Slurm)."""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from .cell import CELL_FILE

LOWER_IS_BETTER = ("traj_err_px", "piq_mse", "piq_mse_norm", "fvd")
PLOTTED = ("psnr", "ssim", "traj_err_px", "piq_score", "piq_spatiotemporal_iou_norm")
DEFAULT_QUALITY = ("piq_score", "psnr")


def load_cells(sweep_dir: Path) -> list[dict]:
    cells = []
    for f in sorted((sweep_dir / "cells").glob(f"*/{CELL_FILE}")):
        if f.parent.name.startswith("."):      # a staging directory: not complete
            continue
        rec = json.loads(f.read_text())
        rec["dir"] = str(f.parent)
        cells.append(rec)
    # checkpoints in training order, then the sampler settings
    return sorted(cells, key=lambda c: (c["training_step"] if c["training_step"] is not None else -1,
                                        c["checkpoint"], json.dumps(c["settings"]["sampler"], sort_keys=True)))


def swept_sampler_keys(cells: list[dict]) -> list[str]:
    """Sampler keys whose value differs between cells (num_steps always shown)."""
    keys = sorted({k for c in cells for k in c["sampler"]})
    varying = [k for k in keys if len({json.dumps(c["sampler"].get(k)) for c in cells}) > 1]
    return ["num_steps"] + [k for k in varying if k != "num_steps"]


def metric_names(cells: list[dict]) -> list[str]:
    names: list[str] = []
    for c in cells:
        names += [k for k in c["metrics"] if k not in names]
    return names


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def rows(cells: list[dict]) -> tuple[list[str], list[list]]:
    keys, metrics = swept_sampler_keys(cells), metric_names(cells)
    header = ["cell", "checkpoint", "training_step", *keys]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_ci95"]
    header += ["fvd", "forwards_per_chunk", "seconds_per_chunk", "frames_per_second", "clips"]
    out = []
    for c in cells:
        r = [Path(c["dir"]).name, c["checkpoint_label"], c["training_step"], *(c["sampler"].get(k) for k in keys)]
        for m in metrics:
            v = c["metrics"].get(m, {})
            r += [v.get("mean"), v.get("ci95")]
        r += [c.get("fvd"), c["forwards_per_chunk"], c["seconds_per_chunk"], c["frames_per_second"], len(c["clips"])]
        out.append(r)
    return header, out


def write_csv(path: Path, header: list[str], table: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([[_fmt(v, 6) for v in r] for r in table])
    tmp.replace(path)


def markdown(cells: list[dict]) -> str:
    keys, metrics = swept_sampler_keys(cells), metric_names(cells)
    head = ["checkpoint", "step", *keys, *metrics, "FVD", "fwd/chunk", "s/chunk", "frames/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        vals = [c["checkpoint_label"], _fmt(c["training_step"]), *(_fmt(c["sampler"].get(k)) for k in keys)]
        for m in metrics:
            v = c["metrics"].get(m)
            vals.append("" if v is None else _fmt(v["mean"]) + (f" ± {_fmt(v['ci95'], 2)}" if _fmt(v["ci95"]) else ""))
        vals += [_fmt(c.get("fvd")) or "skipped", f"{c['forwards_per_chunk']:.1f}", f"{c['seconds_per_chunk']:.3f}",
                 f"{c['frames_per_second']:.2f}"]
        lines.append("| " + " | ".join(vals) + " |")
    base = cells[0]["baseline_copy_last_frame"]
    lines.append("")
    lines.append(f"Mean ± 95% interval over {len(cells[0]['clips'])} clips. Copy-last-frame baseline on the same "
                 f"clips: " + ", ".join(f"{k} {_fmt(v['mean'])}" for k, v in base.items()) + ".")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats in both seconds (lower) and quality, by increasing seconds."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if higher_is_better else points[i][1]))
    front, best = [], None
    for i in order:
        q = points[i][1]
        if best is None or (q > best if higher_is_better else q < best):
            front.append(i)
            best = q
    return front


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _series(cells, group_key, x_key):
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(group_key(c), []).append(c)
    return {g: sorted(cs, key=x_key) for g, cs in groups.items()}


def plot(cells: list[dict], sweep_dir: Path, quality: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOTTED if m in metric_names(cells)]
    others = [k for k in swept_sampler_keys(cells) if k != "num_steps"]
    setting = lambda c: ", ".join(f"{k}={c['sampler'].get(k)}" for k in others)  # noqa: E731
    out = []

    def panels(name, group_key, x_key, xlabel, title_group):
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for g, cs in _series(cells, group_key, x_key).items():
                xs = [x_key(c) for c in cs]
                ys = [c["metrics"][m]["mean"] if m in c["metrics"] else np.nan for c in cs]
                es = [c["metrics"][m]["ci95"] if m in c["metrics"] else np.nan for c in cs]
                ax.errorbar(xs, ys, yerr=np.nan_to_num(es), marker="o", ms=4, capsize=3, label=g or title_group)
            ax.set_xlabel(xlabel)
            ax.set_title(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        path = sweep_dir / name
        _save(fig, path)
        out.append(path)

    ckpt = lambda c: c["checkpoint_label"] + (f", {setting(c)}" if others else "")  # noqa: E731
    panels("metric_vs_num_steps.png", ckpt, lambda c: c["sampler"]["num_steps"], "sampler num_steps", "checkpoint")
    if all(c["training_step"] is not None for c in cells):
        by_setting = lambda c: f"num_steps={c['sampler']['num_steps']}" + (f", {setting(c)}" if others else "")  # noqa
        panels("metric_vs_training_step.png", by_setting, lambda c: c["training_step"], "training step", "sampler")

    higher = quality not in LOWER_IS_BETTER
    pts = [(c["seconds_per_chunk"], c["metrics"][quality]["mean"]) for c in cells]
    front = pareto_front(pts, higher)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", label="cells")
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "o-", color="tab:red", label="Pareto front")
    for i, c in enumerate(cells):
        ax.annotate(f"{c['checkpoint_label']}, {c['sampler']['num_steps']} st", pts[i], fontsize=7,
                    textcoords="offset points", xytext=(4, 3))
    ax.set_xlabel("seconds per chunk")
    ax.set_ylabel(quality + (" (lower is better)" if not higher else ""))
    ax.set_title("quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = sweep_dir / "pareto.png"
    _save(fig, path)
    out.append(path)
    return out


def grid(cells: list[dict], sweep_dir: Path) -> list[Path]:
    """One row per cell continuing the same clip, the truth on top; grid.mp4 and a still strip grid.png."""
    from magi_train.data.video_codec import read_video, write_video

    first = cells[0]
    same = [c for c in cells if c["clips"][:1] == first["clips"][:1] and (Path(c["dir"]) / "clip0.mp4").is_file()]
    if not same:
        return []
    truth, fps = read_video(Path(same[0]["dir"]) / "clip0_truth.mp4")
    videos = [truth] + [read_video(Path(c["dir"]) / "clip0.mp4")[0] for c in same]
    T = min(len(v) for v in videos)
    scale = max(1, 128 // truth.shape[2])
    rows_ = [v[:T].repeat(scale, axis=1).repeat(scale, axis=2) for v in videos]
    rows_ = [np.pad(r, ((0, 0), (0, 2), (0, 0), (0, 0))) for r in rows_]   # a dark line between rows
    video = np.concatenate(rows_, axis=1)
    video = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]
    out = [write_video(sweep_dir / "grid.mp4", video, fps)]
    P = first["settings"]["clips"]["prefix_frames"]
    picks = sorted({min(T - 1, i) for i in (P - 1, P, P + (T - P) // 3, P + 2 * (T - P) // 3, T - 1)})
    labels = ["truth"] + [f"{c['checkpoint_label']} " + " ".join(f"{k}={v}" for k, v in c["settings"]["sampler"].items())
                          for c in same]
    still = np.concatenate([np.concatenate([_label(text, r.shape[1])] + [r[i] for i in picks], axis=1)
                            for text, r in zip(labels, rows_)], axis=0)
    from PIL import Image

    Image.fromarray(still).save(sweep_dir / "grid.png")
    out.append(sweep_dir / "grid.png")
    (sweep_dir / "grid_rows.txt").write_text("\n".join(labels) + f"\nframes in grid.png: {picks} (the prefix ends at "
                                                                  f"frame {P - 1})\n")
    return out


def _label(text: str, height: int, width: int = 200) -> np.ndarray:
    """A dark panel with the row's name (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (20, 20, 20))
    ImageDraw.Draw(img).text((4, max(0, height // 2 - 6)), text[:34], fill=(230, 230, 230))
    return np.asarray(img)


def aggregate(sweep_dir: Path, quality: str | None = None) -> dict:
    sweep_dir = Path(sweep_dir)
    cells = load_cells(sweep_dir)
    if not cells:
        print(f"[magi_eval] aggregate: no complete cell under {sweep_dir / 'cells'}", file=sys.stderr)
        return {"cells": 0}
    names = metric_names(cells)
    if quality is None:
        quality = next(q for q in DEFAULT_QUALITY + tuple(names) if q in names)
    elif quality not in names:
        raise ValueError(f"--quality: {quality!r} is not a metric of this sweep; accepted: {', '.join(names)}")
    header, table = rows(cells)
    write_csv(sweep_dir / "results.csv", header, table)
    md = markdown(cells)
    (sweep_dir / "results.md").write_text(md)
    plots = plot(cells, sweep_dir, quality)
    videos = grid(cells, sweep_dir)
    if all(c.get("fvd") is None for c in cells):
        print("[magi_eval] fvd: skipped (fvd.i3d_path is not set: FVD needs local I3D weights; nothing is downloaded)")
    print(md)
    print(f"[magi_eval] {len(cells)} cells -> {sweep_dir / 'results.csv'}, results.md, "
          + ", ".join(p.name for p in plots + videos))
    return {"cells": len(cells), "plots": plots, "videos": videos}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m magi_eval.aggregate", description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--quality", help="metric of the Pareto plot (default: piq_score when present, else psnr)")
    args = ap.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"error: sweep_dir: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        aggregate(Path(args.sweep_dir), args.quality)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
