"""Video codec: round trips, atomic writes, clear errors on bad input and corrupt files."""
import numpy as np
import pytest

from magi_train.data.video_codec import CorruptVideoError, probe_video, read_video, write_video


def _smooth_frames(t=12, h=32, w=48):
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 5 + k * 8) % 256, (y * 7) % 256, np.full_like(x, 40 + 10 * k)], -1) for k in range(t)]
    return np.stack(frames).astype(np.uint8)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".mov", "libx264"), (".webm", "libvpx-vp9")])
def test_round_trip(tmp_path, suffix, codec):
    frames = _smooth_frames()
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=12, codec=codec)
    out, fps = read_video(path)
    assert out.shape == frames.shape and out.dtype == np.uint8 and fps == pytest.approx(12.0)
    assert np.abs(out.astype(float) - frames).mean() < 6.0
    assert probe_video(path) == {"fps": pytest.approx(12.0), "frames": 12 if suffix != ".webm" else 0,
                                 "height": 32, "width": 48, "codec": probe_video(path)["codec"]}
    assert [p.name for p in tmp_path.iterdir()] == [f"clip{suffix}"], "temporary file left behind"


def test_fractional_fps_and_bytes_input(tmp_path):
    path = write_video(tmp_path / "a.mp4", _smooth_frames(t=6), fps=30000 / 1001)
    frames, fps = read_video(path.read_bytes())
    assert frames.shape[0] == 6 and fps == pytest.approx(29.97, abs=1e-3)
    assert read_video(path, max_frames=2)[0].shape[0] == 2


def test_odd_size_and_bad_frames_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="even height and width, got 31x48"):
        write_video(tmp_path / "odd.mp4", _smooth_frames(h=31), fps=12)
    with pytest.raises(ValueError, match="dtype uint8"):
        write_video(tmp_path / "f.mp4", _smooth_frames().astype(np.float32), fps=12)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "z.mp4", _smooth_frames(), fps=0)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.mp4"
    target.write_bytes(b"old")
    with pytest.raises(Exception):
        write_video(target, _smooth_frames(), fps=12, codec="no-such-codec")
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_corrupt_inputs_raise_clear_errors(tmp_path):
    data = write_video(tmp_path / "ok.mp4", _smooth_frames(t=24), fps=12).read_bytes()
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptVideoError, match=r"half.mp4: (truncated|cannot decode)"):
        read_video(tmp_path / "half.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CorruptVideoError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(CorruptVideoError):
        read_video(data[:300])
    with pytest.raises(CorruptVideoError):
        probe_video(b"")
