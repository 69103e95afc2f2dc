"""The encoders plug into data_tools.precompute and magi_infer by configuration alone: the same commands and
configs switch between the small defaults and the MAGI-1 architectures (T5 / ViT VAE) in release layouts."""
import os
import tarfile

import pytest
import torch
from safetensors.torch import load as load_safetensors

from magi_train.encoders import vae_kind_of
from magi_train.encoders.tiny_models import write_tiny_magi_vae, write_tiny_t5
from magi_train.encoders.vae_small import SmallVAE, SmallVAEArch


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    small = SmallVAE(SmallVAEArch(latent_channels=4, base_channels=8, blocks=1))
    small.save_pretrained(str(root / "small_vae"))
    write_tiny_magi_vae(str(root / "magi_vae"))
    write_tiny_t5(str(root / "t5"))
    return root


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    from data_tools.make_shards import make_shards
    from data_tools.synthetic_world import WorldConfig, write_dataset
    root = tmp_path_factory.mktemp("raw")
    write_dataset(root / "videos", 2, WorldConfig(height=32, width=32, num_frames=8), seed=5, progress=False)
    make_shards(root / "videos", root / "shards", progress=False)
    return root / "shards"


def _latent_samples(directory):
    found = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(directory / name) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".safetensors"):
                        data = load_safetensors(tar.extractfile(member).read())
                        found[member.name.split(".", 1)[1]] = next(iter(data.values()))
    return found


@pytest.mark.parametrize("kind", ["small", "magi"])
def test_precompute_by_config(kind, encoder_dirs, raw_shards, tmp_path):
    from data_tools.precompute import main as precompute_main
    text = ["--text-kind", "hash"] if kind == "small" else ["--text-kind", "t5", "--text-path",
                                                            str(encoder_dirs / "t5")]
    precompute_main([str(raw_shards), str(tmp_path / "latents"), "--vae-kind", kind, "--vae-path",
                     str(encoder_dirs / f"{kind}_vae"), *text, "--device", "cpu"])
    samples = _latent_samples(tmp_path / "latents")
    latent, emb = samples["latent.safetensors"], samples["text.safetensors"]
    # small: 4x spatial, 1x temporal; MAGI-1: 8x spatial, 4x temporal (8 frames -> 2 latent frames)
    assert tuple(latent.shape) == ((4, 8, 8, 8) if kind == "small" else (4, 2, 4, 4))
    assert emb.shape[-1] == (64 if kind == "small" else 32)


def test_inference_builds_encoders_from_runtime_keys(encoder_dirs):
    from magi_infer.config import InferConfig
    from magi_infer.runner import build_encoders
    from magi_train.encoders.text_t5 import T5TextEncoder
    from magi_train.encoders.vae_magi import MagiVAE

    assert vae_kind_of(str(encoder_dirs / "magi_vae")) == "magi"
    assert vae_kind_of(str(encoder_dirs / "small_vae")) == "small"
    cfg = InferConfig(t5_pretrained=str(encoder_dirs / "t5"), vae_pretrained=str(encoder_dirs / "magi_vae"),
                      scale_factor=0.18215, temporal_downsample_factor=4)
    text, vae = build_encoders(cfg, torch.device("cpu"))
    assert isinstance(text, T5TextEncoder) and isinstance(vae, MagiVAE) and vae.scale_factor == 0.18215
    emb, mask = text.encode(["a red ball falls"])
    assert emb.shape == (1, cfg.model.caption_max_length, 32) and mask[0, 0]
    cfg = InferConfig(vae_pretrained=str(encoder_dirs / "small_vae"), temporal_downsample_factor=1)
    text, vae = build_encoders(cfg, torch.device("cpu"))
    assert isinstance(vae, SmallVAE) and text.dim == cfg.model.caption_channels
