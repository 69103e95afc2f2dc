#!/usr/bin/env python
"""What the V2V trajectory error of an evaluation cell is made of: the (frame, object) pairs whose object the
tracker finds in the prediction, and their centroid error, against the pairs it loses, which magi_eval counts as
far as the frame's diagonal (45 px at 32x32). Reads the cell's clip videos (run magi_eval with videos=N for all N
clips; the mp4s are crf 18, so a pixel or two may differ from the frames magi_eval scored). One row per cell;
--per-frame adds a table per cell by predicted frame (the pairs both the model and copy-last-frame keep);
--by-objects one by the number of objects in the clip (the error as magi_eval counts it, lost pairs at the diagonal).

  python scripts/quickstart_traj_split.py --clips runs/quickstart/world/val [--per-frame] [--by-objects] CELL [CELL ...]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def split(cell: Path, clips: Path, prefix: int) -> dict:
    from data_tools.world_tracker import track_centroids
    from magi_train.data.video_codec import read_video
    from magi_train.evaluation import copy_last_frame

    found, found_copy, lost, n, clips_seen = [], [], 0, 0, 0
    by_objects: dict[int, list] = {}   # objects in the clip -> [clips, model error sum, copy error sum, pairs]
    per_frame = None  # per predicted frame: model error sum, copy error sum, pairs both keep, pairs the model lost
    for video in sorted(cell.glob("clip*[0-9].mp4"), key=lambda p: int(p.stem[4:])):
        i = int(video.stem[4:])
        traj = json.loads((clips / f"val-{i:06d}.json").read_text())
        pred = read_video(video)[0][prefix:]
        truth_frames = read_video(cell / f"clip{i}_truth.mp4")[0]
        copy = copy_last_frame(truth_frames[:prefix], len(pred))
        objs = traj["objects"]
        truth = np.stack([np.asarray(o["centers"], np.float64)[prefix:prefix + len(pred)] for o in objs], axis=1)
        colours = [o["rgb"] for o in objs]
        visible = np.isfinite(truth).all(-1)
        dists = []
        for frames, out in ((pred, found), (copy, found_copy)):
            d = np.hypot(*(track_centroids(frames, colours) - truth).transpose(2, 0, 1))
            dists.append(d)
            out.extend(d[visible & np.isfinite(d)].tolist())
        model_lost = visible & ~np.isfinite(dists[0])
        lost += int(model_lost.sum())
        n += int(visible.sum())
        both = visible & np.isfinite(dists[0]) & np.isfinite(dists[1])
        rows = np.stack([np.where(both, dists[0], 0).sum(1), np.where(both, dists[1], 0).sum(1), both.sum(1),
                         model_lost.sum(1)], axis=1)
        per_frame = rows if per_frame is None else per_frame + rows
        diagonal = float(np.hypot(traj["width"], traj["height"]))   # magi_eval's count for a lost object
        row = by_objects.setdefault(len(objs), [0, 0.0, 0.0, 0])
        row[0] += 1
        row[1] += float(np.where(np.isfinite(dists[0]), dists[0], diagonal)[visible].sum())
        row[2] += float(np.where(np.isfinite(dists[1]), dists[1], diagonal)[visible].sum())
        row[3] += int(visible.sum())
        clips_seen += 1
    return {"clips": clips_seen, "pairs": n, "lost": lost / max(n, 1), "found_err": float(np.mean(found)),
            "copy_found_err": float(np.mean(found_copy)), "per_frame": per_frame, "by_objects": by_objects}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", required=True, help="the held-out clips (world/val) with their trajectory json")
    ap.add_argument("--prefix-frames", type=int, default=12)
    ap.add_argument("--per-frame", action="store_true", help="also a table by predicted frame for each cell")
    ap.add_argument("--by-objects", action="store_true", help="also a table by the number of objects in a clip")
    ap.add_argument("cells", nargs="+")
    args = ap.parse_args(argv)
    results = [(cell, split(Path(cell), Path(args.clips), args.prefix_frames)) for cell in args.cells]
    print("| cell | clips | (frame, object) pairs | lost | error of the found px | copy-last-frame's px |")
    print("|---|---|---|---|---|---|")
    for cell, r in results:
        print(f"| {Path(cell).name} | {r['clips']} | {r['pairs']} | {r['lost']:.1%} | {r['found_err']:.2f} "
              f"| {r['copy_found_err']:.2f} |")
    for cell, r in results if args.per_frame else ():
        print(f"\n{Path(cell).name}\n| predicted frame | model px | copy-last-frame px | model / copy | pairs lost |")
        print("|---|---|---|---|---|")
        for f, (m, c, k, lost) in enumerate(r["per_frame"], 1):
            print(f"| {f} | {m / max(k, 1):.2f} | {c / max(k, 1):.2f} | {m / max(c, 1e-9):.2f} | {int(lost)} |")
    for cell, r in results if args.by_objects else ():
        print(f"\n{Path(cell).name}\n| objects in the clip | clips | model px | copy-last-frame px | model / copy |")
        print("|---|---|---|---|---|")
        for k, (clips_k, m, c, pairs) in sorted(r["by_objects"].items()):
            print(f"| {k} | {clips_k} | {m / pairs:.2f} | {c / pairs:.2f} | {m / c:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
