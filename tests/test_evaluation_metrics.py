"""Continuation scores: the truth scores perfectly, copy-last-frame does not, on a real synthetic clip."""
import numpy as np

from data_tools.synthetic_world import WorldConfig, generate_clip
from magi_train.evaluation import psnr_per_frame, score_continuation, ssim_per_frame
from magi_train.evaluation.continuation import copy_last_frame


def test_identical_frames_score_perfectly():
    v = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    assert (psnr_per_frame(v, v) == 100).all()
    assert np.allclose(ssim_per_frame(v, v), 1.0)
    noisy = np.clip(v.astype(int) + 20, 0, 255).astype(np.uint8)
    assert (psnr_per_frame(noisy, v) < 30).all() and (ssim_per_frame(noisy, v) < 1).all()


def test_truth_beats_copy_last_frame_on_trajectories():
    clip = generate_clip(WorldConfig(height=32, width=32, num_frames=24, fps=8, min_objects=2, max_objects=2), seed=3)
    prefix, future = clip.frames[:12], clip.frames[12:]
    truth = score_continuation(future, future, clip.trajectories, first_frame=12)
    copy = score_continuation(copy_last_frame(prefix, 12), future, clip.trajectories, first_frame=12)
    assert truth.summary()["traj_err_px"] < 1.0
    assert copy.summary()["traj_err_px"] > truth.summary()["traj_err_px"]
    assert truth.summary()["psnr"] == 100
