"""Synthetic world: determinism, trajectories that match the pixels, physics and captions that tell the truth."""
import json

import numpy as np
import pytest

from data_tools.synthetic_world import WorldConfig, generate_clip, track_centroids, trajectory_error, write_dataset
from data_tools.world_physics import Body, PhysicsParams, overlap, simulate
from magi_train.data.video_codec import read_video


def _reference(clip):
    return np.array([o["centers"] for o in clip.trajectories["objects"]]).transpose(1, 0, 2)


def _rgbs(clip):
    return [o["rgb"] for o in clip.trajectories["objects"]]


def test_same_seed_same_bytes(tmp_path):
    cfg = WorldConfig(height=32, width=32, num_frames=12)
    # encoded in fresh processes (see write_dataset), each run its own pool
    write_dataset(tmp_path / "a", 4, cfg, seed=7, progress=False, num_workers=2)
    write_dataset(tmp_path / "b", 4, cfg, seed=7, progress=False, num_workers=2)
    write_dataset(tmp_path / "c", 1, cfg, seed=8, progress=False)
    for name in ("train-000000", "train-000001", "train-000002", "train-000003"):
        for ext in ("mp4", "txt", "json"):
            assert (tmp_path / "a" / f"{name}.{ext}").read_bytes() == (tmp_path / "b" / f"{name}.{ext}").read_bytes()
    assert (tmp_path / "a" / "train-000000.mp4").read_bytes() != (tmp_path / "c" / "train-000000.mp4").read_bytes()
    assert not list(tmp_path.rglob(".*tmp*")), "temporary files left behind"
    frames, fps = read_video(tmp_path / "a" / "train-000001.mp4")
    assert frames.shape == (12, 32, 32, 3) and fps == 12.0
    # in any process, the same seed renders the same frames, caption and trajectories
    one, two = generate_clip(cfg, 123), generate_clip(cfg, 123)
    assert np.array_equal(one.frames, two.frames) and one.caption == two.caption
    assert one.trajectories == two.trajectories


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (40, 72)])
def test_trajectories_match_rendered_pixels_within_1px(size):
    cfg = WorldConfig(height=size[0], width=size[1], num_frames=24, fps=12, max_objects=4)
    worst = 0.0
    for seed in range(12):
        clip = generate_clip(cfg, seed)
        err = trajectory_error(track_centroids(clip.frames, _rgbs(clip)), _reference(clip))
        assert err["visible"] == 1.0, f"seed {seed}: an object is not visible in some frame"
        worst = max(worst, err["max_px"])
    assert worst < 1.0, f"centroid measured from pixels is {worst:.2f} px from the json trajectory"


def test_trajectories_match_decoded_mp4_loosely(tmp_path):
    cfg = WorldConfig(height=32, width=32, num_frames=24)
    write_dataset(tmp_path, 4, cfg, seed=3, progress=False)
    for i in range(4):
        frames, _ = read_video(tmp_path / f"train-{i:06d}.mp4")
        traj = json.loads((tmp_path / f"train-{i:06d}.json").read_text())
        ref = np.array([o["centers"] for o in traj["objects"]]).transpose(1, 0, 2)
        err = trajectory_error(track_centroids(frames, [o["rgb"] for o in traj["objects"]]), ref)
        assert err["visible"] == 1.0 and err["mean_px"] < 0.75 and err["max_px"] < 2.5, err


def test_clip_contents_vary_and_match_config():
    cfg = WorldConfig(height=48, width=64, fps=8, num_frames=16, min_objects=1, max_objects=3)
    clips = [generate_clip(cfg, s) for s in range(30)]
    assert all(c.frames.shape == (16, 48, 64, 3) and c.frames.dtype == np.uint8 for c in clips)
    counts = {len(c.trajectories["objects"]) for c in clips}
    shapes = {o["shape"] for c in clips for o in c.trajectories["objects"]}
    backgrounds = {c.trajectories["background"]["kind"] for c in clips}
    assert counts == {1, 2, 3} and shapes == {"ball", "square"} and backgrounds == {"solid", "gradient"}
    for c in clips:
        colours = [o["colour"] for o in c.trajectories["objects"]]
        assert len(set(colours)) == len(colours), "two objects of one clip share a colour"
        for o in c.trajectories["objects"]:
            assert len(o["centers"]) == 16 and o["colour"] in c.caption
            assert ("radius" in o) == (o["shape"] == "ball") and ("size" in o) == (o["shape"] == "square")
            assert o["extent"] >= 3.0


def test_dropped_ball_caption_and_physics():
    """A lone ball at rest falls, bounces off the floor with restitution, and the caption says so."""
    cfg = WorldConfig(height=64, width=64, fps=24, num_frames=72, min_objects=1, max_objects=1, shapes=("ball",),
                      drop_probability=1.0)
    clip = generate_clip(cfg, 5)
    ys = np.array(clip.trajectories["objects"][0]["centers"])[:, 1]
    xs = np.array(clip.trajectories["objects"][0]["centers"])[:, 0]
    r = clip.trajectories["objects"][0]["radius"]
    assert np.allclose(xs, xs[0]), "a dropped ball must not drift sideways"
    assert ys.max() <= 64 - r + 1e-6 and ys[1] > ys[0], "falls, never through the floor"
    floor = [e for e in clip.trajectories["events"] if e["kind"] == "floor"]
    assert len(floor) >= 2 and floor[1]["speed"] < floor[0]["speed"], "bounces lose speed (restitution < 1)"
    assert clip.caption.startswith(f"a {clip.trajectories['objects'][0]['colour']} ball falls and bounces")


def test_collisions_keep_bodies_apart_and_are_captioned():
    p = PhysicsParams(width=64, height=64, gravity=0.0, restitution=1.0, event_speed=1.0)
    a = Body("ball", 5.0, np.array([16.0, 32.0]), np.array([40.0, 0.0]))
    b = Body("square", 5.0, np.array([48.0, 32.0]), np.array([-40.0, 0.0]))
    centres, events = simulate([a, b], p, num_frames=24, fps=12)
    kinds = [e.kind for e in events]
    assert kinds[0] == "collision" and "wall_left" in kinds and "wall_right" in kinds
    gaps = centres[:, 1, 0] - centres[:, 0, 0]
    assert gaps.min() >= 10.0 - 1e-6, "ball and square overlapped"
    energy = a.mass * (a.vel ** 2).sum() + b.mass * (b.vel ** 2).sum()
    assert energy == pytest.approx((a.mass + b.mass) * 40.0 ** 2, rel=1e-6), "restitution 1 must keep the energy"
    # captions of crowded clips mention the collisions they contain
    cfg = WorldConfig(height=32, width=32, min_objects=3, max_objects=3)
    for seed in range(10):
        clip = generate_clip(cfg, seed)
        bodies = [Body(o["shape"], o["extent"], np.array(o["centers"][t]), np.zeros(2))
                  for o in clip.trajectories["objects"] for t in [0]]
        assert all(overlap(x, y) is None for i, x in enumerate(bodies) for y in bodies[i + 1:])
        if any(e["kind"] == "collision" and e["speed"] > 10 for e in clip.trajectories["events"]):
            assert "collide" in clip.caption


def test_tracker_is_nan_when_object_absent_and_tolerates_noise():
    clip = generate_clip(WorldConfig(height=32, width=32, min_objects=2, max_objects=2), 1)
    rng = np.random.default_rng(0)
    noisy = np.clip(clip.frames.astype(int) + rng.integers(-12, 13, clip.frames.shape), 0, 255)
    err = trajectory_error(track_centroids(noisy, _rgbs(clip)), _reference(clip))
    assert err["visible"] == 1.0 and err["max_px"] < 1.0
    absent = track_centroids(clip.frames, _rgbs(clip) + [[128, 0, 255]])
    assert np.isnan(absent[:, 2]).all() and not np.isnan(absent[:, :2]).any()


@pytest.mark.parametrize("field,value", [("max_objects", 20), ("shapes", ("triangle",)), ("height", 8),
                                         ("min_size", 1.0), ("restitution", 1.5), ("backgrounds", ("noise",))])
def test_bad_config_is_a_one_line_error(field, value):
    with pytest.raises(ValueError, match=f"world.{field}"):
        WorldConfig(**{field: value})
