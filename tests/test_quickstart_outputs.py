"""What the quickstart shows a user besides the score table: the PNG strip (truth | model | copy-last-frame)
and the T2V object check (share of frames holding an object of a colour the prompt names, and its travel)."""
import numpy as np
import pytest
from PIL import Image

from data_tools.synthetic_world import WorldConfig, generate_clip
from data_tools.world_tracker import object_presence
from magi_train.evaluation.png_strip import strip_image, write_strip


@pytest.fixture(scope="module")
def clip():
    return generate_clip(WorldConfig(height=32, width=32, num_frames=24, fps=8, min_objects=1, max_objects=1,
                                     drop_probability=1.0), seed=7)


def test_strip_layout(clip, tmp_path):
    v = clip.frames
    copy = np.repeat(v[11:12], 24, axis=0)
    img = strip_image([(v, v, copy), (v, copy, v)], prefix_frames=12, every=2, zoom=4, gap=2)
    # columns: last prefix frame + 6 predicted frames (every 2nd of 12); rows: 3 per clip, 2 clips
    assert img.shape == (2 * (3 * (128 + 2)) + 8, 7 * 128 + 6 * 2 + 2, 3)
    np.testing.assert_array_equal(img[:128, :128], np.kron(v[11], np.ones((4, 4, 1), np.uint8)))
    x0 = 128 + 4 + 5 * (128 + 2)   # the last column holds predicted frame 22 of the truth row
    np.testing.assert_array_equal(img[:128, x0:x0 + 128], np.kron(v[22], np.ones((4, 4, 1), np.uint8)))
    path = write_strip(tmp_path / "s.png", [(v, v, copy)], prefix_frames=12)
    assert np.asarray(Image.open(path)).shape[2] == 3
    with pytest.raises(ValueError, match="prefix_frames: must lie in"):
        strip_image([(v,)], prefix_frames=24)
    with pytest.raises(ValueError, match="the rows of a clip must have one shape"):
        strip_image([(v, v[:12])], prefix_frames=6)


def test_object_presence_sees_a_falling_object_and_not_a_background(clip):
    colours = [o["rgb"] for o in clip.trajectories["objects"]]
    seen = object_presence(clip.frames, colours)
    assert seen["frames_with_object"] == 1.0 and seen["travel_px"] > 5.0 and seen["pixels"] > 10
    background = np.broadcast_to(clip.frames[:, :1, :1], clip.frames.shape)
    assert object_presence(background, colours)["frames_with_object"] == 0.0
    # a blurred, background-coloured smear of the object is not an object
    faded = (0.3 * clip.frames.astype(np.float32) + 0.7 * background).astype(np.uint8)
    assert object_presence(faded, colours)["frames_with_object"] == 0.0
    still = np.repeat(clip.frames[:1], 24, axis=0)
    assert object_presence(still, colours)["travel_px"] == 0.0
