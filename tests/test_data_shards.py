"""make_shards: videos + captions -> webdataset shards; bad files are reported, never fatal."""
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_tools.make_shards import main as make_shards_cli
from data_tools.make_shards import make_shards
from data_tools.synthetic_world import WorldConfig, generate_clip, write_dataset
from magi_train.data.shard_format import load_index, scan_shard
from magi_train.data.video_codec import write_video


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """6 synthetic clips + a webm with a json caption in a subfolder + five problem files."""
    src = tmp_path_factory.mktemp("src")
    write_dataset(src, 6, WorldConfig(height=32, width=32, num_frames=12), seed=11, progress=False)
    clip = generate_clip(WorldConfig(height=32, width=32, num_frames=12), 99)
    (src / "sub").mkdir()
    write_video(src / "sub" / "extra.v2.webm", clip.frames, 12, codec="libvpx-vp9")
    (src / "sub" / "extra.v2.json").write_text(json.dumps({"caption": "a webm clip", "objects": []}))
    good = (src / "train-000000.mp4").read_bytes()
    (src / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (src / "truncated.txt").write_text("cut in half")
    (src / "garbage.mov").write_bytes(b"not a video at all" * 50)
    (src / "garbage.txt").write_text("junk")
    write_video(src / "uncaptioned.mp4", clip.frames, 12)
    write_video(src / "short.mp4", clip.frames[:4], 12)
    (src / "short.txt").write_text("too short")
    write_video(src / "small.mp4", clip.frames[:, :16, :16], 12)
    (src / "small.txt").write_text("too small")
    return src


def test_shards_hold_every_good_video_and_report_the_rest(source, tmp_path):
    rep = make_shards(source, tmp_path, max_samples_per_shard=3, min_frames=8, min_height=24, min_width=24,
                      progress=False)
    corrupt = dict(rep.corrupt)
    skipped = dict(rep.skipped)
    assert set(corrupt) == {"truncated.mp4", "garbage.mov"}
    assert set(skipped) == {"uncaptioned.mp4", "short.mp4", "small.mp4"}
    assert "no caption" in skipped["uncaptioned.mp4"] and "min_frames" in skipped["short.mp4"]
    assert rep.videos_found == 12 and rep.samples_written == 7
    assert rep.shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((tmp_path / "report.json").read_text())["samples_written"] == 7

    # standard webdataset reads the shards: every sample has its video, caption and metadata
    samples = list(wds.WebDataset([str(tmp_path / s) for s in rep.shards], shardshuffle=False))
    by_key = {s["__key__"]: s for s in samples}
    assert sorted(by_key) == ["sub__extra_v2"] + [f"train-{i:06d}" for i in range(6)]
    for i in range(6):
        s = by_key[f"train-{i:06d}"]
        assert s["mp4"] == (source / f"train-{i:06d}.mp4").read_bytes(), "video bytes must be stored as they are"
        assert s["txt"].decode() == (source / f"train-{i:06d}.txt").read_text().strip()
        meta = json.loads(s["json"])
        assert (meta["fps"], meta["frames"], meta["height"], meta["width"]) == (12.0, 12, 32, 32)
        assert meta["trajectories"] == json.loads((source / f"train-{i:06d}.json").read_text())
    extra = by_key["sub__extra_v2"]
    assert "webm" in extra and extra["txt"] == b"a webm clip" and json.loads(extra["json"])["trajectories"] == {
        "objects": []}


def test_sidecar_index_matches_tar_headers_and_rebuild_is_identical(source, tmp_path):
    make_shards(source, tmp_path / "a", max_samples_per_shard=4, progress=False)
    with pytest.raises(FileExistsError):
        make_shards(source, tmp_path / "a", progress=False)
    make_shards(source, tmp_path / "b", max_samples_per_shard=4, progress=False)
    make_shards(source, tmp_path / "a", max_samples_per_shard=4, overwrite=True, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        side, scan = load_index(tmp_path / "a" / name), scan_shard(tmp_path / "a" / name)
        assert [(s.key, s.members, s.info) for s in side.samples] == [(s.key, s.members, s.info) for s in scan.samples]


def test_csv_captions_and_shard_size_limit(source, tmp_path):
    csv = tmp_path / "captions.csv"
    csv.write_text("video,caption\ntrain-000001.mp4,\"from the csv, with a comma\"\nuncaptioned.mp4,now captioned\n")
    limit_mb = 0.008
    rep = make_shards(source, tmp_path / "out", shard_size_mb=limit_mb, captions_csv=csv, progress=False)
    assert "uncaptioned.mp4" not in dict(rep.skipped) and rep.samples_written == 10
    assert len(rep.shards) >= 3
    for name in rep.shards:   # sample bytes stay under the limit, unless one sample alone is larger
        index = load_index(tmp_path / "out" / name)
        payload = sum(size for s in index.samples for _, size in s.members.values())
        assert len(index.samples) == 1 or payload <= limit_mb * 2**20
    with tarfile.open(tmp_path / "out" / rep.shards[0]) as tar:
        caps = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert caps.get("train-000001.txt", "from the csv, with a comma") == "from the csv, with a comma"
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="captions_csv: needs a header"):
        make_shards(source, tmp_path / "out2", captions_csv=bad, progress=False)


def test_cli_prints_summary_with_parallel_checks(source, tmp_path, capsys):
    make_shards_cli([str(source), str(tmp_path), "--max-samples-per-shard", "2", "--workers", "2"])
    out = capsys.readouterr().out
    assert "9/12 videos -> 5 shards" in out and "corrupt: truncated.mp4" in out and "skipped: uncaptioned.mp4" in out
    assert np.all([(tmp_path / f"shard-{i:06d}.tar").exists() for i in range(5)])
