"""Pieces of the sweep summary with answers known by hand: the Pareto front, the 95% interval, the Fréchet
distance of FVD and its refusal to download weights."""
import math

import numpy as np
import pytest

from magi_eval.aggregate import pareto_front
from magi_train.evaluation.fvd import I3DFeatures, frechet_distance
from magi_train.evaluation.stats import mean_ci95


def test_pareto_front_keeps_points_nothing_beats():
    # (seconds per chunk, quality): (2, 0.5) is beaten by (1, 0.6); (3, 0.6) ties in quality but is slower
    pts = [(1.0, 0.6), (2.0, 0.5), (3.0, 0.9), (3.0, 0.6), (0.5, 0.1)]
    assert pareto_front(pts, higher_is_better=True) == [4, 0, 2]
    err = [(1.0, 5.0), (2.0, 6.0), (3.0, 1.0)]               # lower is better (trajectory error)
    assert pareto_front(err, higher_is_better=False) == [0, 2]


def test_interval_uses_student_t():
    mean, ci = mean_ci95([1.0, 2.0, 3.0])                      # sd 1, n 3: t(2) = 4.303
    assert mean == 2.0 and ci == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(mean_ci95([5.0])[1]) and mean_ci95([5.0])[0] == 5.0
    assert mean_ci95([1.0, float("nan"), 3.0])[0] == 2.0     # undefined values (no object in view) are left out


def test_frechet_distance_of_gaussians_by_hand():
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, 1.0])
    c1, c2 = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(9 + (2 - 1) ** 2 + (1 - 3) ** 2)
    rot = np.array([[0.6, -0.8], [0.8, 0.6]])                  # invariant under a rotation of the feature space
    assert frechet_distance(rot @ mu1, rot @ c1 @ rot.T, rot @ mu2, rot @ c2 @ rot.T) == pytest.approx(14.0)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_fvd_needs_a_local_file():
    with pytest.raises(FileNotFoundError, match="fvd.i3d_path"):
        I3DFeatures("/nonexistent/i3d_torchscript.pt")
