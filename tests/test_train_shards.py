"""The loop on real shards: a folder of clips -> raw shards -> latent shards, trained from both kinds (the raw
kind encodes in the training process), with held-out validation and resume of the shard position."""
import pytest
import torch

from data_tools.make_shards import make_shards
from data_tools.precompute import precompute
from data_tools.synthetic_world import WorldConfig, write_dataset
from magi_train.encoders.build import build_text_encoder, build_vae
from magi_train.encoders.config import TextEncoderConfig, VAEConfig
from magi_train.training import Trainer, read_metrics
from magi_train.training.config_loading import load_config

# the small VAE (no weights given: a fresh one) makes 8-channel latents at 1/4 size, no temporal downsampling
MODEL = ["model.in_channels=8", "model.out_channels=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    world = WorldConfig(height=32, width=32, num_frames=12)
    write_dataset(root / "clips", 4, world, seed=1, progress=False)
    write_dataset(root / "held_out", 2, world, seed=2, progress=False)
    for name in ("clips", "held_out"):
        make_shards(root / name, root / f"{name}_raw", max_samples_per_shard=2, progress=False)
    torch.manual_seed(0)
    vae, text = build_vae(VAEConfig(kind="small")), build_text_encoder(TextEncoderConfig(kind="hash", dim=64))
    for name in ("clips", "held_out"):
        precompute(root / f"{name}_raw", root / f"{name}_latent", vae, text, rank=0, world_size=1, progress=False)
    return root


def _args(tmp_path, kind, root, name):
    return ["train=smoke", f"data={kind}", f"data.shards={root / f'clips_{kind}'}",
            f"data.val_shards={root / f'held_out_{kind}'}", "data.num_workers=0", "data.batch_size=2",
            "data.num_frames=12", "data.resolution=null", f"output_dir={tmp_path}", f"name={name}",
            "train.progress_bar=false", "train.wandb.mode=disabled", "train.max_steps=3",
            "train.checkpoint.every_steps=2", "train.validation.every_steps=3", "encoders.text.dim=64", *MODEL]


@pytest.mark.parametrize("kind", ["latent", "raw"])
def test_train_on_shards_validates_and_resumes_position(shards, tmp_path, kind):
    args = _args(tmp_path, kind, shards, kind)
    trainer = Trainer(load_config(args))
    assert trainer.fit() == 0
    run = tmp_path / kind
    assert sorted(read_metrics(run / "metrics.jsonl")) == [1, 2, 3]
    assert "loss_t0.30" in read_metrics(run / "metrics.jsonl", kind="val")[3]
    position = trainer.loader.state_dict()
    # resuming from step 2 puts the shard reader back where it was after step 2's batch
    resumed = Trainer(load_config(args + [f"resume={run / 'checkpoints' / 'step_00000002'}"]))
    assert resumed.step == 2
    next(resumed.batches)
    assert {k: resumed.loader.state_dict()[k] for k in ("epoch", "batch_in_epoch")} == \
        {k: position[k] for k in ("epoch", "batch_in_epoch")}
