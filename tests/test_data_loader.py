"""Shard reader: rank x worker split, buckets, exact resume, corrupt samples skipped and counted."""
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_tools.make_shards import make_shards
from data_tools.synthetic_world import WorldConfig, write_dataset
from magi_train.data import DataConfig, build_loader, build_validation_loader
from magi_train.data.shard_format import INDEX_SUFFIX, load_index

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
