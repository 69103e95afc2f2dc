"""Physics-IQ motion-mask metrics against masks computed by hand, and the normalisation by two real takes."""
import numpy as np
import pytest

from magi_train.evaluation.physics_iq import (frame_mse, motion_masks, physics_iq_scores, spatial_iou,
                                              spatiotemporal_iou, weighted_spatial_iou)


def _masks(*frames):
    return np.array(frames, dtype=bool)


# four frames of 2x3 masks: a moves, b touches some of it, the last frame is still in both
A = _masks([[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])
B = _masks([[1, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]])


def test_iou_metrics_on_hand_made_masks():
    # where: A moved at 4 pixels, B at 2 of them -> 2/4
    assert spatial_iou(A, B) == pytest.approx(0.5)
    # when and where: frames 1/2, 1/2, 0/2, and the still frame counts 1 -> 2/4
    assert spatiotemporal_iou(A, B) == pytest.approx(0.5)
    # how much: shares of frames A=[.5 .5 0; 0 .25 .25], B=[.25 0 0; 0 0 .25]: sum(min)=.5, sum(max)=1.5
    assert weighted_spatial_iou(A, B) == pytest.approx(1 / 3)
    for f in (spatial_iou, spatiotemporal_iou, weighted_spatial_iou):
        assert f(A, A) == 1.0
        assert f(np.zeros_like(A), np.zeros_like(A)) == 1.0     # nothing moved in either: a perfect match
    assert frame_mse(np.full((1, 2, 2, 3), 255, np.uint8), np.zeros((1, 2, 2, 3), np.uint8)) == 1.0
    with pytest.raises(ValueError, match="differ"):
        spatial_iou(A, B[:3])


def _square_video(frames_with_square: list[bool], size: int = 24, top: int = 9, side: int = 6) -> np.ndarray:
    v = np.zeros((len(frames_with_square), size, size, 3), np.uint8)
    for i, on in enumerate(frames_with_square):
        if on:
            v[i, top:top + side, top:top + side] = 255
    return v


def _grown(size, top, side, rule) -> np.ndarray:
    """Pixels at distance (dy, dx) outside the square (0 inside) that the rule keeps."""
    out = np.zeros((size, size), bool)
    for y in range(size):
        for x in range(size):
            dy = max(top - y, y - (top + side - 1), 0)
            dx = max(top - x, x - (top + side - 1), 0)
            out[y, x] = rule(dy, dx)
    return out


def test_motion_mask_of_an_appearing_square_by_hand():
    # a white 6x6 square appears on black in frame 1 and stays. The 5-tap blur [1 4 6 4 1]/16 gives, across an
    # edge, the profile 1, 5 | 11, 15, 16, 16, 15, 11 | 5, 1 (/16) and a pixel 255 * fy * fx.
    # Frame 1: average 0.3*g, difference 0.7*g > 10 for g >= 15: the square grown by 1 px (the diagonal corner
    # 255*25/256 = 25 included) plus, 2 px out, the 4 middle pixels of each side (255*15/256 = 15 and 16); those
    # 1-px-deep arms hold no 5x5 square, so the opening removes them. Frame 2: average 0.51*g, difference 0.49*g > 10
    # for g >= 22: the square grown by 1 px again. Frame 3: the square vanishes, motion where it was.
    masks = motion_masks(_square_video([False, True, True, False]))
    assert not masks[0].any()                                   # the first frame has no past: no motion
    grown = _grown(24, 9, 6, lambda dy, dx: dy <= 1 and dx <= 1)
    np.testing.assert_array_equal(masks[1], grown)
    np.testing.assert_array_equal(masks[2], grown)
    assert masks[3].any()                                       # it vanishes: motion again


def test_specks_and_still_videos_have_no_motion():
    still = _square_video([True] * 4)
    assert not motion_masks(still).any()
    speck = np.zeros((2, 24, 24, 3), np.uint8)
    speck[1, 12, 12] = 255                                      # one pixel: removed by the 5x5 opening
    assert not motion_masks(speck).any()


def test_normalised_by_two_real_takes():
    take1 = _square_video([False, True, True, True])
    take2 = np.roll(take1, 2, axis=2)                           # the second take lands 2 px to the right
    s = physics_iq_scores(take2, take1, take2)                  # a model as good as a second real take
    assert s.raw == pytest.approx(s.variance)
    n = s.normalised()
    for k in ("spatial_iou", "spatiotemporal_iou", "weighted_spatial_iou"):
        assert n[k] == pytest.approx(1.0) and s.variance[k] < 1.0
    assert n["mse"] == pytest.approx(0.0) and s.score() == pytest.approx(1.0)
    still = physics_iq_scores(np.repeat(take1[:1], 4, axis=0), take1, take2)   # predicts nothing moving
    assert still.raw["spatial_iou"] == 0.0 and still.score() < 0.5
    assert set(s.summary()) >= {"piq_spatial_iou", "piq_spatiotemporal_iou_norm", "piq_mse_norm", "piq_score"}
