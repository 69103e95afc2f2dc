"""A PNG strip of continuations to look at: for each clip, rows truth | model | copy-last-frame, columns the last
prefix frame and then every few predicted frames, each frame enlarged (nearest neighbour) so 32 px stays legible.

    write_strip(path, [(truth, model, copy), ...], prefix_frames=12, every=2)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

ROW_NAMES = ("truth", "model", "copy-last-frame")


def strip_image(clips: Sequence[tuple[np.ndarray, ...]], prefix_frames: int, every: int = 2, zoom: int = 4,
                gap: int = 2) -> np.ndarray:
    """uint8 [H, W, 3]. clips: per clip, videos uint8 [T, h, w, 3] of equal shape holding the prefix and the
    continuation (truth | model | copy-last-frame, or any rows); column 0 is the last prefix frame."""
    if not clips:
        raise ValueError("clips: nothing to draw")
    if every < 1 or zoom < 1:
        raise ValueError(f"every, zoom: must be >= 1, got {every}, {zoom}")
    blocks = []
    for rows in clips:
        shapes = {r.shape for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"clips: the rows of a clip must have one shape, got {sorted(shapes)}")
        t = rows[0].shape[0]
        if not 0 < prefix_frames < t:
            raise ValueError(f"prefix_frames: must lie in (0, {t}), got {prefix_frames}")
        columns = [prefix_frames - 1, *range(prefix_frames, t, every)]
        lines = []
        for video in rows:
            frames = [np.kron(video[c], np.ones((zoom, zoom, 1), np.uint8)) for c in columns]
            sep = np.full((frames[0].shape[0], gap, 3), 255, np.uint8)
            # a wider white gap after the prefix frame marks where the prediction starts
            line = [frames[0], sep, sep] + [x for f in frames[1:] for x in (f, sep)]
            lines.append(np.concatenate(line[:-1], axis=1))
        width = max(line.shape[1] for line in lines)
        row_gap = np.full((gap, width, 3), 255, np.uint8)
        blocks.append(np.concatenate([x for line in lines for x in (line, row_gap)], axis=0))
    width = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=255) for b in blocks]
    clip_gap = np.full((4 * gap, width, 3), 255, np.uint8)
    return np.concatenate([x for b in blocks for x in (b, clip_gap)][:-1], axis=0)


def write_strip(path: str | Path, clips: Sequence[tuple[np.ndarray, ...]], prefix_frames: int, every: int = 2,
                zoom: int = 4, labels: Sequence[str] | None = ROW_NAMES, gap: int = 2) -> Path:
    """Write strip_image(...) as a PNG (atomically: a reader never sees half a file), with each row's name in a
    left margin (labels=None: no margin)."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(strip_image(clips, prefix_frames, every, zoom, gap))
    if labels:
        margin = 96
        framed = Image.new("RGB", (img.width + margin, img.height), "white")
        framed.paste(img, (margin, 0))
        draw = ImageDraw.Draw(framed)
        row_h = clips[0][0].shape[1] * zoom + gap
        y = 0
        for rows in clips:
            for i in range(len(rows)):
                if i < len(labels):
                    draw.text((4, y + i * row_h + row_h // 2 - 6), labels[i], fill="black")
            y += len(rows) * row_h + 4 * gap
        img = framed
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
