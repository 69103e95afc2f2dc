"""Rendering of the synthetic world: anti-aliased balls and squares over a dark background.

Colours: object colours are saturated and bright, backgrounds dark and unsaturated, so that a pixel's nearest
palette colour tells which object it belongs to even after lossy compression (see world_tracker).
"""
from __future__ import annotations

import numpy as np

# Object colours, pairwise at least ~75 apart in RGB and >= 150 from every background colour.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (245, 145, 30),
    "yellow": (240, 225, 40),
    "green": (50, 200, 70),
    "cyan": (40, 210, 220),
    "blue": (50, 90, 240),
    "purple": (160, 60, 230),
    "pink": (245, 110, 190),
    "white": (240, 240, 240),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 14),
    "dark grey": (52, 52, 56),
    "navy": (16, 22, 50),
    "dark green": (18, 42, 26),
    "dark brown": (50, 34, 22),
}

BACKGROUND_KINDS = ("solid", "gradient")
_SUPERSAMPLE = 8


def background_image(height: int, width: int, kind: str, top: tuple[int, int, int],
                     bottom: tuple[int, int, int]) -> np.ndarray:
    """float32 [H, W, 3] in 0..255: one colour (solid) or a vertical blend from top to bottom (gradient)."""
    top_c, bottom_c = np.asarray(top, np.float32), np.asarray(bottom, np.float32)
    if kind == "solid":
        return np.broadcast_to(top_c, (height, width, 3)).copy()
    a = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None, None]
    return np.broadcast_to((1 - a) * top_c + a * bottom_c, (height, width, 3)).copy()


def _interval_cover(lo: float, hi: float, n: int) -> np.ndarray:
    """Fraction of each unit pixel [k, k+1), k < n, that lies inside [lo, hi]."""
    k = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(k + 1, hi) - np.maximum(k, lo), 0.0, 1.0)


def coverage(shape: str, size: float, cx: float, cy: float, height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """Per-pixel area fraction covered by the shape, on its bounding box: (rows, cols, alpha [h, w])."""
    r0, r1 = max(int(np.floor(cy - size)), 0), min(int(np.ceil(cy + size)) + 1, height)
    c0, c1 = max(int(np.floor(cx - size)), 0), min(int(np.ceil(cx + size)) + 1, width)
    if shape == "square":   # exact: the area of a box is separable in x and y
        ay = _interval_cover(cy - size, cy + size, r1)[r0:r1]
        ax = _interval_cover(cx - size, cx + size, c1)[c0:c1]
        return slice(r0, r1), slice(c0, c1), ay[:, None] * ax[None, :]
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    ys = (np.arange(r0, r1)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(c0, c1)[:, None] + offs[None, :]).reshape(-1)
    inside = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2 <= size * size
    alpha = inside.reshape(r1 - r0, _SUPERSAMPLE, c1 - c0, _SUPERSAMPLE).mean(axis=(1, 3))
    return slice(r0, r1), slice(c0, c1), alpha


def render(centres: np.ndarray, shapes: list[str], sizes: list[float], rgbs: list[tuple[int, int, int]],
           background: np.ndarray) -> np.ndarray:
    """Paint every body (in index order) over the background for each frame: uint8 [T, H, W, 3]."""
    height, width = background.shape[:2]
    out = np.empty((centres.shape[0], height, width, 3), np.uint8)
    colours = [np.asarray(c, np.float32) for c in rgbs]
    for t in range(centres.shape[0]):
        img = background.copy()
        for i, (shape, size) in enumerate(zip(shapes, sizes)):
            rows, cols, alpha = coverage(shape, size, centres[t, i, 0], centres[t, i, 1], height, width)
            a = alpha[..., None].astype(np.float32)
            img[rows, cols] = img[rows, cols] * (1 - a) + colours[i] * a
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out
