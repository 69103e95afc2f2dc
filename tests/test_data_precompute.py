"""precompute: raw shards -> latent shards with the inference encoders; resumable, split by rank; latent reader."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from data_tools.make_shards import make_shards
from data_tools.precompute import main as precompute_cli
from data_tools.precompute import precompute
from data_tools.synthetic_world import WorldConfig, write_dataset
from magi_train.data import DataConfig, build_loader, read_video
from magi_train.data.shard_format import load_index, read_members
from magi_train.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae

NUM_CLIPS = 6


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    write_dataset(root / "src", NUM_CLIPS, WorldConfig(height=32, width=32, num_frames=12), seed=2, progress=False)
    make_shards(root / "src", root / "raw", max_samples_per_shard=2, progress=False)
    return root


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return build_vae(VAEConfig(kind="small")), build_text_encoder(TextEncoderConfig(kind="hash"))


@pytest.fixture(scope="module")
def latent(raw, encoders):
    vae, text = encoders
    rep = precompute(raw / "raw", raw / "latent", vae, text, rank=0, world_size=1, progress=False)
    assert rep.samples_written == NUM_CLIPS and len(rep.shards_written) == 3 and not rep.corrupt
    return raw / "latent"


def test_latents_and_text_are_the_encoders_outputs(raw, latent, encoders):
    vae, text = encoders
    index = load_index(latent / "shard-000001.tar")
    ref = index.samples[0]
    with open(latent / "shard-000001.tar", "rb") as f:
        m = read_members(f, ref)
    frames, _ = read_video(raw / "src" / f"{ref.key}.mp4")
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    want = vae.encode(video)[0]
    got = load_safetensors(m["latent.safetensors"])["latent"]
    assert got.shape == want.shape == (vae.latent_channels, 12, 8, 8) and torch.allclose(got, want, atol=1e-5)
    caption = (raw / "src" / f"{ref.key}.txt").read_text().strip()
    emb, mask = text.encode([caption])
    tokens = load_safetensors(m["text.safetensors"])["emb"]
    assert torch.equal(tokens, emb[0][mask[0]])
    meta = json.loads(m["json"])
    assert meta["latent_shape"] == list(want.shape) and meta["text_length"] == int(mask.sum())
    assert meta["vae"]["spatial_factor"] == vae.spatial_factor and meta["fps"] == 12.0
    assert meta["trajectories"]["objects"], "ground-truth trajectories travel with the sample"


def test_latent_loader_batches(latent, encoders):
    loader = build_loader(DataConfig(kind="latent", shards=str(latent), batch_size=4, num_workers=2, seed=1))
    batches = [b for b, _ in zip(loader, range(loader.batches_in_epoch(0)))]
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"train-{i:06d}" for i in range(NUM_CLIPS)]
    b = batches[0]
    assert b["latent"].dtype == torch.float32 and b["latent"].shape == (4, 8, 12, 8, 8)
    assert b["text_emb"].shape[0] == 4 and b["text_emb"].shape[2] == encoders[1].dim
    lengths = b["text_mask"].sum(1)
    assert lengths.max() == b["text_emb"].shape[1] and (b["text_emb"][~b["text_mask"]] == 0).all()
    fixed = build_loader(DataConfig(kind="latent", shards=str(latent), batch_size=2, num_workers=0, text_length=40,
                                    num_frames=6))
    fb = next(iter(fixed))
    assert fb["text_emb"].shape[1] == 40 and fb["latent"].shape[2] == 6


def test_resumable_and_split_by_rank(raw, latent, encoders, tmp_path, monkeypatch):
    vae, text = encoders
    out = tmp_path / "latent"
    shutil.copytree(latent, out)
    (out / "shard-000001.tar").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    rep = precompute(raw / "raw", out, vae, text, rank=0, world_size=1, progress=False)
    assert rep.shards_written == ["shard-000001.tar"] and sorted(rep.shards_already_done) == sorted(before)
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items()), "finished shards rewritten"
    assert (out / "shard-000001.tar").read_bytes() == (latent / "shard-000001.tar").read_bytes()

    # torchrun-style split: RANK / WORLD_SIZE from the environment, disjoint and complete
    written = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written.append(precompute(raw / "raw", tmp_path / "split", vae, text, progress=False).shards_written)
    assert sorted(written[0] + written[1]) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not set(written[0]) & set(written[1])


def test_corrupt_raw_sample_is_reported_and_bf16_cli(raw, tmp_path, capsys):
    bad = tmp_path / "raw"
    shutil.copytree(raw / "raw", bad)
    shard = bad / "shard-000000.tar"
    off, size = load_index(shard).samples[0].members["mp4"]
    with open(shard, "r+b") as f:
        f.seek(off)
        f.write(np.zeros(size, np.uint8).tobytes())
    precompute_cli([str(bad), str(tmp_path / "out"), "--dtype", "bfloat16", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert f"{NUM_CLIPS - 1} samples, 1 corrupt" in printed and "shard-000000.tar/train-000000" in printed
    with open(tmp_path / "out" / "shard-000002.tar", "rb") as f:
        m = read_members(f, load_index(tmp_path / "out" / "shard-000002.tar").samples[0])
    assert load_safetensors(m["latent.safetensors"])["latent"].dtype == torch.bfloat16
    batch = next(iter(build_loader(DataConfig(kind="latent", shards=str(tmp_path / "out"), num_workers=0))))
    assert batch["latent"].dtype == torch.float32 and batch["text_emb"].dtype == torch.float32
