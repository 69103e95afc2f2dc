"""The quickstart's latent space carries the objects: its VAE, made by the quickstart's own command, must give
latents in which an object stands out of the background (issue 21: a VAE trained under load collapsed to the
background, spatial std 0.002, and the DiT could then learn no object)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magi_train.encoders import VAEConfig, build_vae
from magi_train.encoders.vae_small import SmallVAEArch
from magi_train.encoders.vae_training import object_signal, to_model_range

ROOT = Path(__file__).resolve().parent.parent
OBJECT_SIGNAL_FLOOR = 0.4   # spatial std inside a latent frame, in units of the latent's std (quickstart's: 0.69)
pytestmark = pytest.mark.usefixtures("one_thread")


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_script", ROOT / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart_vae(tmp_path_factory):
    from data_tools.synthetic_world import WorldConfig, write_dataset

    root = tmp_path_factory.mktemp("latents")
    write_dataset(root / "world", 12, WorldConfig(height=32, width=32, num_frames=8, fps=8), seed=5, progress=False)
    cmd = _quickstart().vae_command(root / "world", root / "vae")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "vae"


def _clip(seed: int) -> np.ndarray:
    from data_tools.synthetic_world import WorldConfig, generate_clip

    return generate_clip(WorldConfig(height=32, width=32, num_frames=8, fps=8), seed).frames


def test_latents_carry_the_objects(quickstart_vae):
    vae = build_vae(VAEConfig(kind="small", path=str(quickstart_vae)))   # as precompute and magi_infer load it
    clips = [_clip(100 + i) for i in range(6)]
    assert object_signal(vae, clips) > OBJECT_SIGNAL_FLOOR
    saved = json.loads((quickstart_vae / "config.json").read_text())["training"]["metrics"]
    assert saved["object_signal"] > OBJECT_SIGNAL_FLOOR
    # scaled latents have about unit std, so the floor is relative to the latent scale
    z = vae.encode(torch.stack([to_model_range(c) for c in clips]))
    assert 0.7 < z.std().item() < 1.4
    # the objects come back: 12 principal components of 4x4 RGB blocks (fit here on 12 short clips: ~30 dB;
    # on the quickstart's 764: 34 dB held out)
    from magi_train.encoders.vae_training import evaluate_psnr
    assert evaluate_psnr(vae, clips) > 27.0


def test_all_components_reconstruct_exactly(tmp_path):
    from magi_train.encoders.vae_training import VAETrainConfig, train_vae

    metrics = train_vae(VAETrainConfig(out=str(tmp_path / "vae"), synthetic=4, synthetic_size=32, synthetic_frames=4,
                                       val_clips=2, architecture="patch", latent_channels=48, progress=False))
    assert metrics["steps"] == 0 and metrics["held_out_psnr"] > 80
    vae = build_vae(VAEConfig(kind="small", path=str(tmp_path / "vae")))
    basis = vae.codec.basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(48), atol=1e-5, rtol=0)   # orthonormal components


def test_object_signal_is_zero_for_a_collapsed_latent_space():
    """The measure itself: a VAE that keeps only each frame's mean colour scores ~0 (what the test must catch)."""
    class MeanColour(torch.nn.Module):
        spatial_factor = 4
        device = torch.device("cpu")

        def encode(self, video):
            z = torch.nn.functional.avg_pool3d(video, (1, 4, 4))
            return z.mean(dim=(3, 4), keepdim=True).expand_as(z) * 3.0

    clips = [_clip(100 + i) for i in range(3)]
    assert object_signal(MeanColour(), clips) < 1e-6


def test_patch_architecture_checks_its_shape():
    with pytest.raises(ValueError, match="vae.latent_channels: a patch VAE keeps at most the 48 values of a 4x4 RGB"):
        SmallVAEArch(architecture="patch", latent_channels=64)
    with pytest.raises(ValueError, match="vae.temporal_factor: a patch VAE works frame by frame"):
        SmallVAEArch(architecture="patch", latent_channels=48, temporal_factor=2)
    with pytest.raises(ValueError, match="vae.architecture: got 'vit', accepted values are conv, patch"):
        SmallVAEArch(architecture="vit")
