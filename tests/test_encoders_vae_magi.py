"""MAGI-1 VAE: release key names and layout, strict loading, shapes over frame counts, tiled decode."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from magi_train.encoders import VAEConfig, build_vae
from magi_train.encoders.tiny_models import TINY_MAGI_VAE as TINY, write_tiny_magi_vae
from magi_train.encoders.vae_magi import MagiVAE, MagiVAEArch

# Names as the released checkpoint spells them (a few of each kind).
RELEASE_KEYS = [
    "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias", "encoder.cls_token", "encoder.pos_embed",
    "encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.attn.qkv.bias", "encoder.blocks.0.attn.proj.weight",
    "encoder.blocks.1.norm2.weight", "encoder.blocks.1.mlp.fc1.weight", "encoder.blocks.1.mlp.fc2.bias",
    "encoder.norm.weight", "encoder.last_layer.weight", "decoder.proj_in.weight", "decoder.cls_token",
    "decoder.pos_embed", "decoder.blocks.0.attn.qkv.weight", "decoder.norm.bias", "decoder.last_layer.weight",
]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vae") / "vae")
    return write_tiny_magi_vae(directory), directory


def test_release_layout_and_key_names(saved_tiny):
    _, directory = saved_tiny
    assert sorted(os.listdir(directory)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.load(open(os.path.join(directory, "config.json")))
    assert config["_class_name"] == "ViTVAE" and config["ddconfig"]["patch_length"] == 4
    keys = set(load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors")))
    assert set(RELEASE_KEYS) <= keys
    assert not any(".norm1." in k for k in keys)  # ln_in_attn: the release has no first block norm
    w = load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    assert tuple(w["encoder.patch_embed.proj.weight"].shape) == (256, 3, 4, 8, 8)
    assert tuple(w["decoder.last_layer.weight"].shape) == (3, 256 // (4 * 8 * 8), 3, 3, 3)


def test_loads_strictly_and_reproduces(saved_tiny):
    model, directory = saved_tiny
    vae = build_vae(VAEConfig(kind="magi", path=directory, temporal_downsample_factor=4))
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor, vae.scale_factor) == (4, 8, 4, 0.18215)
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, _ = model.encode_moments(x)
    torch.testing.assert_close(vae.encode(x), mean * 0.18215)


def test_bf16_close_to_fp32(saved_tiny):
    _, directory = saved_tiny
    fp32 = build_vae(VAEConfig(kind="magi", path=directory))
    bf16 = build_vae(VAEConfig(kind="magi", path=directory, dtype="bf16"))
    assert bf16.param_dtype == torch.bfloat16
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    a, b = fp32.encode(x), bf16.encode(x)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()
    assert bf16.decode(b).dtype == torch.float32


def test_strict_loading_errors(saved_tiny, tmp_path):
    _, directory = saved_tiny
    weights = load_file(os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(open(os.path.join(directory, "config.json")).read())
    weights.pop("decoder.proj_in.bias")
    weights["encoder.extra"] = torch.zeros(1)
    save_file(weights, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing .*decoder.proj_in.bias.*1 unexpected .*encoder.extra"):
        build_vae(VAEConfig(kind="magi", path=str(broken)))
    with pytest.raises(FileNotFoundError, match="VAE directory not found: /nonexistent/vae"):
        build_vae(VAEConfig(kind="magi", path="/nonexistent/vae"))
    os.remove(broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="VAE weights not found: .*diffusion_pytorch_model.safetensors"):
        build_vae(VAEConfig(kind="magi", path=str(broken)))
    with pytest.raises(ValueError, match="temporal_downsample_factor: config says 2 but the weights"):
        build_vae(VAEConfig(kind="magi", path=directory, temporal_downsample_factor=2))


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (4, 1), (5, 2), (24, 6)])
def test_encode_decode_shapes(saved_tiny, frames, latent_frames):
    _, directory = saved_tiny
    vae = build_vae(VAEConfig(kind="magi", path=directory, tile_height=32, tile_width=32))
    x = torch.rand(2, 3, frames, 48, 64) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, latent_frames, 6, 8) and vae.latent_frames(frames) == latent_frames
    assert vae.decode(z).shape == (2, 3, vae.video_frames(latent_frames), 48, 64)
    out = vae.decode(z, num_frames=frames)
    assert out.shape == x.shape and out.abs().max() <= 1.0 and torch.isfinite(out).all()


def test_single_frame_is_four_copies(saved_tiny):
    """MAGI-1 encodes an image as four identical frames; so do we (the padding rule)."""
    _, directory = saved_tiny
    vae = build_vae(VAEConfig(kind="magi", path=directory))
    image = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(vae.encode(image), vae.encode(image.expand(-1, -1, 4, -1, -1)))


def test_tiled_decode_matches_untiled():
    """With attention and position tables out of the way (depth 0, zero positions) the VAE is local, so tiled
    decoding must reproduce the untiled one: exactly where overlaps cover the 3x3x3 output conv's halo, and
    everywhere but the seam frames with MAGI-1's end-to-end temporal tiles (temporal overlap 0)."""
    torch.manual_seed(1)
    model = MagiVAE(MagiVAEArch(**{**TINY, "depth": 0}))
    with torch.no_grad():
        model.encoder.pos_embed.zero_()
        model.decoder.pos_embed.zero_()
    z = torch.randn(1, 4, 6, 12, 16)
    model.tiling.enabled = False
    full = model.decode(z)
    assert full.std() > 0.3 and full.abs().max() == 1.0  # a real spread of values, clamped like real output
    model.tiling.enabled, model.tiling.height, model.tiling.width, model.tiling.frames = True, 48, 48, 8
    model.tiling.temporal_overlap = 0.5
    torch.testing.assert_close(model.decode(z), full, atol=1e-5, rtol=0)  # 2x3x4 overlapping tiles
    model.tiling.temporal_overlap = 0.0
    diff = (model.decode(z) - full).abs().amax(dim=(0, 1, 3, 4))
    seams = [7, 8, 15, 16]  # frames on either side of a temporal tile boundary
    assert diff[[t for t in range(24) if t not in seams]].max() < 1e-5
    assert diff[seams].min() > 1e-3
    # a tile as large as the clip is the untiled path
    model.tiling.height, model.tiling.width, model.tiling.frames = 96, 128, 24
    torch.testing.assert_close(model.decode(z), full)
