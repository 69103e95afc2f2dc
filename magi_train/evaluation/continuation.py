"""Score a predicted continuation of a synthetic clip against the truth, next to two references:
copy-last-frame (the trivial predictor a world model must beat) and ground truth (the tracker's own error)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools.world_tracker import track_centroids

from .image_metrics import psnr_per_frame, ssim_per_frame


@dataclass
class ContinuationScores:
    psnr: np.ndarray          # [F] per future frame
    ssim: np.ndarray          # [F]
    traj_err: np.ndarray      # [F] mean centroid distance (px) over objects visible in both, NaN if none

    def summary(self) -> dict:
        return {"psnr": float(np.nanmean(self.psnr)), "ssim": float(np.nanmean(self.ssim)),
                "traj_err_px": float(np.nanmean(self.traj_err))}


def trajectory_truth(trajectories: dict, frames: slice) -> tuple[np.ndarray, list]:
    """[F, n_obj, 2] true centres and the objects' colours from the synthetic world's json."""
    objs = trajectories["objects"]
    centres = np.stack([np.asarray(o["centers"], np.float64)[frames] for o in objs], axis=1)
    return centres, [o["rgb"] for o in objs]


def _per_frame_traj_error(pred_frames: np.ndarray, truth: np.ndarray, colours) -> np.ndarray:
    tracked = track_centroids(pred_frames, colours)
    d = np.hypot(*(tracked - truth).transpose(2, 0, 1))     # [F, n]
    out = np.full(len(d), np.nan)
    for i, row in enumerate(d):
        ok = np.isfinite(row)
        # an object the prediction lost entirely counts as far away as the frame's diagonal
        truth_ok = np.isfinite(truth[i]).all(-1)
        lost = truth_ok & ~np.isfinite(row)
        vals = np.concatenate([row[ok], np.full(lost.sum(), np.hypot(*pred_frames.shape[1:3]))])
        out[i] = vals.mean() if len(vals) else np.nan
    return out


def score_continuation(pred: np.ndarray, truth_frames: np.ndarray, trajectories: dict, first_frame: int) -> ContinuationScores:
    """pred, truth_frames: uint8 [F, H, W, 3] for frames first_frame .. first_frame+F-1 of the clip."""
    F_ = len(truth_frames)
    if pred.shape != truth_frames.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from the true continuation {truth_frames.shape}")
    truth_c, colours = trajectory_truth(trajectories, slice(first_frame, first_frame + F_))
    return ContinuationScores(psnr_per_frame(pred, truth_frames), ssim_per_frame(pred, truth_frames),
                              _per_frame_traj_error(pred, truth_c, colours))


def copy_last_frame(prefix: np.ndarray, num_frames: int) -> np.ndarray:
    return np.repeat(prefix[-1:], num_frames, axis=0)
