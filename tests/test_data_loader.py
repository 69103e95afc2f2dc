"""Shard reader: rank x worker split, buckets, exact resume, corrupt samples skipped, counted and named; data
with no usable sample stops with one line; the data tools' missing inputs are one line."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_tools.make_shards import make_shards
from data_tools.synthetic_world import WorldConfig, write_dataset
from magi_train.data import DataConfig, build_loader, build_validation_loader
from magi_train.data.shard_format import INDEX_SUFFIX, load_index, write_shard
from magi_train.data.skip_guard import DataUnusable

REPO = Path(__file__).resolve().parents[1]

SIZES = {"a": (WorldConfig(height=32, width=32, num_frames=12), 9), "b": (WorldConfig(height=32, width=48,
                                                                                     num_frames=8), 5)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """14 clips of two shapes (32x32x12 and 32x48x8) in 5 raw shards; returns (shard dir, {key: caption})."""
    root = tmp_path_factory.mktemp("data")
    for split, (cfg, n) in SIZES.items():
        write_dataset(root / "src" / split, n, cfg, seed=5, split_name=split, progress=False)
    make_shards(root / "src", root / "raw", max_samples_per_shard=3, progress=False)
    captions = {f"{p.parent.name}__{p.stem}": p.read_text().strip() for p in (root / "src").rglob("*.txt")}
    return root / "raw", captions


def _cfg(shards, **kw):
    base = dict(kind="raw", shards=str(shards), batch_size=2, num_workers=2, shuffle_buffer=4, seed=3)
    return DataConfig(**{**base, **kw})


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_two_ranks_two_workers_read_every_sample_once_per_epoch(dataset):
    shards, captions = dataset
    seen = []
    for rank in range(2):
        loader = build_loader(_cfg(shards), rank=rank, world_size=2)
        n = loader.batches_in_epoch(0)
        for batch in _take(loader, n):
            assert batch["video"].shape[0] == len(batch["key"]) and batch["video"].dtype == torch.float32
            assert batch["video"].min() >= -1 and batch["video"].max() <= 1
            for key, caption in zip(batch["key"], batch["caption"]):
                assert caption == captions[key]
            seen += [(rank, k) for k in batch["key"]]
        assert loader.state_dict()["epoch"] == 0 and loader.state_dict()["batch_in_epoch"] == n
    keys = [k for _, k in seen]
    assert sorted(keys) == sorted(captions), "union over ranks must be complete, each sample once"
    assert len({k for r, k in seen if r == 0} & {k for r, k in seen if r == 1}) == 0
    assert abs(sum(r == 0 for r, _ in seen) - sum(r == 1 for r, _ in seen)) <= 1


def test_batches_have_one_shape_and_epochs_reshuffle(dataset):
    shards, captions = dataset
    loader = build_loader(_cfg(shards, batch_size=3, num_workers=0))
    n0, n1 = loader.batches_in_epoch(0), loader.batches_in_epoch(1)
    batches = _take(loader, n0 + n1)
    shapes = {tuple(b["video"].shape[2:]) for b in batches}
    assert shapes == {(12, 32, 32), (8, 32, 48)}
    for b in batches:   # a batch's keys come from one bucket
        assert len({k[0] for k in b["key"]}) == 1
    epoch0 = [k for b in batches[:n0] for k in b["key"]]
    epoch1 = [k for b in batches[n0:] for k in b["key"]]
    assert sorted(epoch0) == sorted(epoch1) == sorted(captions) and epoch0 != epoch1


@pytest.mark.parametrize("k", [3, 9])   # mid-epoch, and past the end of epoch 0
def test_resume_gives_exactly_the_uninterrupted_stream(dataset, k):
    shards, _ = dataset
    cfg = _cfg(shards, num_frames=6, random_crop=True, resolution=(24, 24))   # random crops must resume too
    full = _take(build_loader(cfg, rank=1, world_size=2), 12)
    first = build_loader(cfg, rank=1, world_size=2)
    head = _take(first, k)
    state = first.state_dict()
    for workers in (2, 0):   # the saved position does not depend on the number of reader workers
        resumed = build_loader(replace(cfg, num_workers=workers), rank=1, world_size=2)
        resumed.load_state_dict(state)
        tail = _take(resumed, 12 - k)
        stream = head + tail
        assert [b["key"] for b in stream] == [b["key"] for b in full]
        for got, want in zip(stream, full):
            assert torch.equal(got["video"], want["video"])
    assert resumed.state_dict()["stats"]["samples"] == sum(len(b["key"]) for b in full)


def test_resume_refuses_a_different_plan(dataset):
    shards, _ = dataset
    state = build_loader(_cfg(shards, num_workers=0)).state_dict()
    other = build_loader(_cfg(shards, num_workers=0, seed=4))
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def _corrupt_copy(shards: Path, dst: Path) -> str:
    """Copy the shards and overwrite one mp4 member's bytes with garbage (tar structure intact)."""
    shutil.copytree(shards, dst)
    shard = sorted(dst.glob("*.tar"))[1]
    ref = load_index(shard).samples[1]
    off, size = ref.members["mp4"]
    with open(shard, "r+b") as f:
        f.seek(off)
        f.write(b"\x13" * size)
    return ref.key


def test_corrupt_member_is_skipped_and_counted(dataset, tmp_path):
    shards, captions = dataset
    bad_key = _corrupt_copy(shards, tmp_path / "raw")
    loader = build_loader(_cfg(tmp_path / "raw", batch_size=1))
    keys = [k for b in _take(loader, loader.batches_in_epoch(0) - 1) for k in b["key"]]
    assert sorted(keys) == sorted(set(captions) - {bad_key})
    assert loader.stats["skipped_corrupt"] == 1 and loader.stats["skipped_batches"] == 1
    assert loader.stats["corrupt"][0][0] == bad_key and "decode" in loader.stats["corrupt"][0][1]


def test_damaged_tar_header_keeps_the_readable_samples(dataset, tmp_path):
    shards, captions = dataset
    raw = tmp_path / "raw"
    shutil.copytree(shards, raw)
    shard = sorted(raw.glob("*.tar"))[0]
    Path(str(shard)[:-4] + INDEX_SUFFIX).unlink()   # force a header scan
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second_sample_header = members[3].offset   # 3 members per sample
    with open(shard, "r+b") as f:
        f.seek(second_sample_header + 148)     # the header checksum field
        f.write(b"XXXXXXXX")
    loader = build_loader(_cfg(raw, batch_size=1, num_workers=0))
    assert len(loader.index) == len(captions) - 2
    assert loader.stats["index_errors"] and "unreadable tar header" in loader.stats["index_errors"][0]


def test_validation_loader_is_fixed_and_finite(dataset):
    shards, captions = dataset
    cfg = _cfg("unused", val_shards=str(shards), batch_size=4)
    val = build_validation_loader(cfg)
    first = [b["key"] for b in val]
    second = [b["key"] for b in val]
    assert first == second and sorted(k for ks in first for k in ks) == sorted(captions)
    assert [k for ks in first for k in ks][:3] == ["a__a-000000", "a__a-000001", "a__a-000002"]   # stored order


@pytest.mark.parametrize("field,value,match", [("kind", "mp4", "data.kind"), ("batch_size", 0, "data.batch_size"),
                                               ("resolution", (32,), "data.resolution"), ("shards", "", "data.shards"),
                                               ("num_workers", -1, "data.num_workers")])
def test_bad_config_is_a_one_line_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**{"kind": "raw", "shards": "x", field: value})
    with pytest.raises(ValueError, match="data.resolution: applies to raw"):
        DataConfig(kind="latent", shards="x", resolution=(32, 32))


# --- data that can only be skipped (issue 16): one line instead of skipping forever ---

def _latent_sample(key: str, shape=(16, 6, 8, 8), meta_shape=None, caption: str | None = "a ball", nan=False):
    from safetensors.torch import save

    latent = torch.randn(shape)
    if nan:
        latent[0, 0, 0, 0] = float("nan")
    members = {"latent.safetensors": save({"latent": latent}), "text.safetensors": save({"emb": torch.randn(3, 64)}),
               "json": json.dumps({"latent_shape": list(meta_shape or shape), "fps": 24}).encode()}
    if caption is not None:
        members["txt"] = caption.encode()
    return key, members


def _latent_shards(root: Path, samples: list) -> Path:
    for i in range(0, len(samples), 3):
        write_shard(root / f"shard-{i // 3:06d}.tar", samples[i:i + 3])
    return root


@pytest.mark.parametrize("broken,reason", [
    (dict(caption=None), "no caption"),
    (dict(meta_shape=(16, 6, 8, 16)), "shape differs from metadata"),     # latents unlike their metadata
])
def test_an_epoch_without_a_usable_sample_stops_with_one_line(tmp_path, broken, reason):
    shards = _latent_shards(tmp_path, [_latent_sample(f"s{i}", **broken) for i in range(7)])
    loader = build_loader(DataConfig(kind="latent", shards=str(shards), batch_size=2, num_workers=1, seed=0))
    with pytest.raises(DataUnusable, match=f"epoch 0 held no usable sample: 7 skipped \\(7 {reason}\\); last: s"):
        next(iter(loader))   # today: skips batch after batch, epoch after epoch, and never returns


def test_many_skips_in_a_row_stop_early_and_name_reasons_and_counts(dataset, tmp_path):
    shards, captions = dataset
    raw = tmp_path / "raw"
    shutil.copytree(shards, raw)
    for shard in raw.glob("*.tar"):   # every mp4 corrupt, the tar structure intact
        with open(shard, "r+b") as f:
            for ref in load_index(shard).samples:
                off, size = ref.members["mp4"]
                f.seek(off)
                f.write(b"\x13" * size)
    loader = build_loader(_cfg(raw, batch_size=2, num_workers=0, max_consecutive_skips=5))
    with pytest.raises(DataUnusable) as e:
        next(iter(loader))
    line = str(e.value)
    assert line.startswith("data: 6 samples in a row could not be used (6 corrupt video); last: ") and "\n" not in line
    assert loader.stats["skipped_corrupt"] == 6


def test_a_nan_sample_is_named_and_skipped(tmp_path, caplog):
    samples = [_latent_sample(f"s{i}", nan=i == 4) for i in range(6)]
    loader = build_loader(DataConfig(kind="latent", shards=str(_latent_shards(tmp_path, samples)), batch_size=1,
                                     num_workers=0, shuffle=False))
    with caplog.at_level("WARNING"):
        keys = [k for b in _take(loader, 5) for k in b["key"]]
    assert keys == ["s0", "s1", "s2", "s3", "s5"]
    assert loader.stats["corrupt"] == [("s4", "s4: latent holds 1 non-finite values (NaN/inf)")]
    assert "skipped sample s4: latent holds 1 non-finite values (NaN/inf) (non-finite values)" in caplog.text


def test_training_on_unusable_shards_ends_with_one_line(tmp_path):
    """Through the entry point (today: a warning line per sample, never a step, never an exit)."""
    shards = _latent_shards(tmp_path / "shards", [_latent_sample(f"s{i}", meta_shape=(16, 6, 8, 16)) for i in range(4)])
    cmd = [sys.executable, "-m", "magi_train.train", "train=smoke", "data=latent", f"data.shards={shards}",
           "data.num_frames=6", "data.num_workers=0", f"output_dir={tmp_path}", "train.device=cpu",
           "train.progress_bar=false", "train.wandb.mode=disabled", "train.validation.every_steps=0"]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 6 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "data: epoch 0 held no usable sample: 4 skipped (4 shape differs from metadata)" in errors[0]
    assert "skipped sample s0: decoded shape" in r.stderr   # each skipped sample is named


@pytest.mark.parametrize("tool,args,line", [
    ("make_shards", ["{tmp}/missing", "{tmp}/out"], "make_shards: src_dir: not a directory: {tmp}/missing"),
    ("make_shards", ["{tmp}", "{tmp}/out", "--captions-csv", "{tmp}/none.csv"],
     "make_shards: captions_csv: not a file: {tmp}/none.csv"),
    ("precompute", ["{tmp}/missing", "{tmp}/out"], "precompute: raw: 1 shard(s) not found, first: {tmp}/missing"),
])
def test_data_tools_give_one_line_for_a_missing_input(tmp_path, tool, args, line):
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-m", f"data_tools.{tool}", *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == line.format(tmp=tmp_path), r.stderr[-2000:]
    assert not (tmp_path / "out").exists()
