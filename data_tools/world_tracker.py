"""Measure object centroids from pixels by colour: the ground truth check of the synthetic world, and the
trajectory metric of generated videos (evaluation compares these tracks to the json trajectories).

A pixel belongs to object i when object i's colour is the nearest of the given colours and lies within `tol`
(Euclidean RGB distance). Edge pixels blended with the background are far from every object colour and are
left out symmetrically, so the centroid stays on the true centre; codec noise of a few levels is tolerated.
"""
from __future__ import annotations

import numpy as np


def track_centroids(frames: np.ndarray, rgb_list, tol: float = 60.0, min_pixels: int = 1,
                    frames_per_step: int = 16) -> np.ndarray:
    """Centroids (x, y) in pixels, [T, n_obj, 2], NaN where an object has fewer than min_pixels pixels.

    frames: uint8 or float [T, H, W, 3] in 0..255 RGB. Coordinates put pixel (row i, column j)'s centre at
    (j + 0.5, i + 0.5), the convention of the synthetic world's trajectories.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected [T, H, W, 3] RGB, got shape {tuple(frames.shape)}")
    colours = np.asarray(rgb_list, np.float32).reshape(-1, 3)
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    t_count, height, width = frames.shape[:3]
    n = colours.shape[0]
    out = np.full((t_count, n, 2), np.nan)
    if n == 0:
        return out
    ys, xs = np.mgrid[0:height, 0:width]
    xs, ys = xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5
    for start in range(0, t_count, frames_per_step):   # bounded memory for long or large videos
        chunk = frames[start:start + frames_per_step].astype(np.float32)
        dist2 = ((chunk[..., None, :] - colours) ** 2).sum(-1)          # [t, H, W, n]
        nearest = dist2.argmin(-1)
        close = np.take_along_axis(dist2, nearest[..., None], -1)[..., 0] < tol * tol
        for i in range(n):
            mask = close & (nearest == i)                                # [t, H, W]
            count = mask.sum(axis=(1, 2))
            with np.errstate(invalid="ignore", divide="ignore"):
                cx = (mask * xs).sum(axis=(1, 2)) / count
                cy = (mask * ys).sum(axis=(1, 2)) / count
            seen = count >= min_pixels
            out[start:start + len(chunk), i, 0] = np.where(seen, cx, np.nan)
            out[start:start + len(chunk), i, 1] = np.where(seen, cy, np.nan)
    return out


def trajectory_error(measured: np.ndarray, reference: np.ndarray) -> dict:
    """Mean and max Euclidean distance (pixels) over frames/objects visible in both, and the visible fraction."""
    measured, reference = np.asarray(measured, np.float64), np.asarray(reference, np.float64)
    if measured.shape != reference.shape:
        raise ValueError(f"measured: shape {measured.shape} differs from reference {reference.shape}")
    d = np.hypot(*(measured - reference).transpose(2, 0, 1))
    ok = np.isfinite(d)
    if not ok.any():
        return {"mean_px": float("nan"), "max_px": float("nan"), "visible": 0.0}
    return {"mean_px": float(d[ok].mean()), "max_px": float(d[ok].max()), "visible": float(ok.mean())}



def object_presence(frames: np.ndarray, rgb_list, min_pixels: int = 4, tol: float = 60.0) -> dict:
    """Is there an object in generated frames (T2V, where no trajectory is given)? In each frame, the object of
    rgb_list with the most pixels (classified as track_centroids does) counts when it has at least min_pixels
    (a ball of the smallest radius, 3 px, covers ~28 pixels).

    Returns {frames_with_object: fraction of frames, travel_px: largest distance of the centroid of the object
    seen most often from its first position, pixels: mean pixel count of the best object per frame}."""
    frames = np.asarray(frames, np.float32)
    colours = np.asarray(rgb_list, np.float32).reshape(-1, 3)
    if len(frames) == 0 or len(colours) == 0:
        return {"frames_with_object": 0.0, "travel_px": 0.0, "pixels": 0.0}
    dist2 = ((frames[..., None, :] - colours) ** 2).sum(-1)            # [T, H, W, n]
    nearest = dist2.argmin(-1)
    close = np.take_along_axis(dist2, nearest[..., None], -1)[..., 0] < tol * tol
    counts = np.stack([(close & (nearest == i)).sum(axis=(1, 2)) for i in range(len(colours))], axis=1)
    seen = counts.max(axis=1) >= min_pixels
    out = {"frames_with_object": float(seen.mean()), "travel_px": 0.0, "pixels": float(counts.max(axis=1).mean())}
    if seen.any():
        best = int(np.bincount(counts.argmax(axis=1)[seen], minlength=len(colours)).argmax())
        track = track_centroids(frames, colours[best:best + 1], tol=tol, min_pixels=min_pixels)[:, 0]
        ok = track[np.isfinite(track).all(-1)]
        if len(ok) >= 2:
            out["travel_px"] = float(np.hypot(*(ok - ok[0]).T).max())
    return out
