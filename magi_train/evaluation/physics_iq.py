"""Physics-IQ's motion-mask metrics (Motamed et al. 2025, "Do generative video models learn physical principles
from watching videos?"), written here from the benchmark's definitions; no learned model is involved.

A motion mask marks, per frame, the pixels that differ from a running average of the past frames (grayscale,
5x5 Gaussian blur, average updated with weight 0.3, |frame - average| > 10 grey levels, then a 5x5 opening and
closing; the first frame has no motion). Between a generated continuation and a real one:
  spatial IoU           IoU of the masks collapsed over time (where anything moved at all)
  spatio-temporal IoU   per-frame IoU, averaged over frames (where and when), 1 for a frame with no motion in both
  weighted spatial IoU  sum(min) / sum(max) of the per-pixel share of frames in motion (where and how much)
  MSE                   mean squared error of the frames in [0, 1]
Physics-IQ normalises each score by the same score between two real takes of the scene ("physical variance"):
the IoUs are divided by it and the MSE has it subtracted; its score is clip(mean of the three ratios - MSE excess).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

MOTION_THRESHOLD = 10          # grey levels (of 255) between a frame and the running average
AVERAGE_WEIGHT = 0.3           # weight of the new frame in the running average
MORPH_KERNEL = 5               # side of the square opening/closing kernel
_BLUR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)   # the 5x5 Gaussian Physics-IQ's mask generator uses (sigma from size)


def _gray_uint8(frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB [T, H, W, 3] -> grayscale [T, 1, H, W] float holding integers 0..255 (ITU-R 601 weights)."""
    f = torch.as_tensor(np.asarray(frames), dtype=torch.float64)
    g = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    return torch.round(g).clamp(0, 255)[:, None]


def _blur(x: torch.Tensor) -> torch.Tensor:
    taps = torch.tensor(_BLUR_TAPS, dtype=x.dtype) / sum(_BLUR_TAPS)
    k = (taps[:, None] * taps[None, :])[None, None]
    return torch.round(F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k))


def _dilate(m: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(m, MORPH_KERNEL, stride=1, padding=MORPH_KERNEL // 2)


def _erode(m: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-m, MORPH_KERNEL, stride=1, padding=MORPH_KERNEL // 2)


def motion_masks(frames: np.ndarray, threshold: int = MOTION_THRESHOLD) -> np.ndarray:
    """Boolean motion masks [T, H, W] of uint8 RGB frames [T, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T, H, W, 3], got shape {frames.shape}")
    if min(frames.shape[1:3]) < 3:
        raise ValueError(f"frames: {frames.shape[1]}x{frames.shape[2]} px is too small for the 5x5 blur")
    gray = _blur(_gray_uint8(frames))
    avg = gray[0].clone()
    out = [torch.zeros_like(gray[0], dtype=torch.bool)]
    for g in gray[1:]:
        avg = (1 - AVERAGE_WEIGHT) * avg + AVERAGE_WEIGHT * g
        diff = (g - torch.round(avg).clamp(0, 255)).abs()
        m = (diff > threshold).to(torch.float64)[None]
        m = _dilate(_erode(m))          # opening removes specks
        m = _erode(_dilate(m))          # closing fills holes
        out.append(m[0] > 0.5)
    return torch.stack(out)[:, 0].numpy()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """IoU of where anything moved: masks [T, H, W] collapsed over time."""
    _same_shape(masks_a, masks_b)
    return _iou(masks_a.any(0), masks_b.any(0))


def spatiotemporal_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """Per-frame IoU averaged over frames (a frame without motion in either counts 1)."""
    _same_shape(masks_a, masks_b)
    return float(np.mean([_iou(a, b) for a, b in zip(masks_a, masks_b)]))


def weighted_spatial_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """sum(min) / sum(max) of each pixel's share of frames in motion; 1 when nothing moved in either."""
    _same_shape(masks_a, masks_b)
    wa, wb = masks_a.mean(0), masks_b.mean(0)
    union = np.maximum(wa, wb)
    return 1.0 if union.sum() == 0 else float(np.minimum(wa, wb).sum() / union.sum())


def frame_mse(frames_a: np.ndarray, frames_b: np.ndarray) -> float:
    """Mean squared error of uint8 frames scaled to [0, 1]."""
    a, b = np.asarray(frames_a, np.float64) / 255.0, np.asarray(frames_b, np.float64) / 255.0
    _same_shape(a, b)
    return float(((a - b) ** 2).mean())


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"physics_iq: shapes {a.shape} and {b.shape} differ")


METRICS = ("spatial_iou", "spatiotemporal_iou", "weighted_spatial_iou", "mse")


@dataclass
class PhysicsIQScores:
    raw: dict[str, float]         # generated vs take 1
    variance: dict[str, float]    # take 1 vs take 2 (the physical variance)

    def normalised(self) -> dict[str, float]:
        """IoUs divided by their physical variance, MSE minus it (lower is better for MSE, higher for the rest)."""
        out = {k: self.raw[k] / max(self.variance[k], 1e-8) for k in METRICS[:3]}
        out["mse"] = self.raw["mse"] - self.variance["mse"]
        return out

    def score(self) -> float:
        """Physics-IQ's score of one scene in [0, 1]; two real takes score about 1."""
        n = self.normalised()
        return float(np.clip(np.mean([n[k] for k in METRICS[:3]]) - n["mse"], 0.0, 1.0))

    def summary(self) -> dict[str, float]:
        n = self.normalised()
        out = {f"piq_{k}": v for k, v in self.raw.items()}
        out.update({f"piq_{k}_norm": v for k, v in n.items()})
        out["piq_score"] = self.score()
        return out


def _scores(a_frames, a_masks, b_frames, b_masks) -> dict[str, float]:
    return {"spatial_iou": spatial_iou(a_masks, b_masks), "spatiotemporal_iou": spatiotemporal_iou(a_masks, b_masks),
            "weighted_spatial_iou": weighted_spatial_iou(a_masks, b_masks), "mse": frame_mse(a_frames, b_frames)}


def physics_iq_scores(generated: np.ndarray, take1: np.ndarray, take2: np.ndarray) -> PhysicsIQScores:
    """Scores of a generated continuation against take 1, and take 1 against take 2; uint8 [T, H, W, 3] each."""
    m_gen, m1, m2 = motion_masks(generated), motion_masks(take1), motion_masks(take2)
    return PhysicsIQScores(raw=_scores(generated, m_gen, take1, m1), variance=_scores(take1, m1, take2, m2))


__all__ = ["motion_masks", "spatial_iou", "spatiotemporal_iou", "weighted_spatial_iou", "frame_mse",
           "physics_iq_scores", "PhysicsIQScores", "METRICS"]
