"""Hydra configs -> typed MagiConfig: every yaml composes, and bad input stops at start with one line naming the key."""
import pytest

from magi_train.config import (
    PRESETS,
    ConfigError,
    MagiConfig,
    ModelConfig,
    SyntheticDataConfig,
    build_config,
    validate_config,
)
from magi_train.data.config import DataConfig
from magi_train.train import main
from magi_train.training.config_loading import compose_dict, default_config_dir, load_config, normalise_overrides

CONFIGS = default_config_dir()


def test_default_config_builds_and_validates():
    cfg = load_config([])
    assert isinstance(cfg, MagiConfig) and isinstance(cfg.data, SyntheticDataConfig)
    assert cfg.model == ModelConfig()
    validate_config(cfg, world_size=1)


def test_overrides_reach_every_level_and_experiments_set_groups():
    cfg = load_config(["experiment=overfit", "train.optimizer.lr=0.01", "train.flow.t_bins=[0.5]", "name=x",
                       "model.num_layers=3"])
    assert cfg.name == "x" and cfg.train.optimizer.lr == 0.01 and cfg.train.flow.t_bins == [0.5]
    assert cfg.model.num_layers == 3
    assert cfg.data.num_samples == 2 and cfg.train.max_steps == 800     # from experiment/overfit.yaml
    # a key no yaml mentions is still settable (it exists in the dataclass)
    assert load_config(["train.ema.update_every=4"]).train.ema.update_every == 4


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_yaml_equals_preset(name):
    cfg = load_config([f"model={name}"]).model
    preset = ModelConfig(**PRESETS[name])
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels", "gated_linear_unit", "in_channels", "out_channels", "half_channel_vae",
                  "x_rescale_factor", "caption_channels", "caption_max_length"):
        assert getattr(cfg, field) == getattr(preset, field), field


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name in
                                        ("train", "data", "experiment", "parallel")), ids=lambda p: p.stem)
def test_every_group_file_composes(path):
    choice = f"{path.parent.name}={path.stem}"
    values = compose_dict([choice])
    if path.parent.name == "data":
        assert values["data"]["kind"] in ("synthetic", "raw", "latent")
    try:
        build_config(values)
    except ConfigError as e:   # files that leave a mandatory value to the user must say which
        assert "missing mandatory value" in str(e), str(e)


def test_latent_data_with_shards_builds():
    cfg = load_config(["data=latent", "data.shards=/tmp/x", "data.num_frames=12"])
    assert isinstance(cfg.data, DataConfig) and cfg.data.shards == "/tmp/x"


def test_override_normalisation():
    groups = {"model", "train"}
    assert normalise_overrides(["model=debug", "train.seed=1", "name=a", "+x=1", "~y"], groups) == \
        ["model=debug", "++train.seed=1", "++name=a", "+x=1", "~y"]


BAD = [
    (["train.optimizer.lrr=1"], "train.optimizer.lrr", "unknown key"),
    (["train.lr=1e-3"], "train.lr", "train.optimizer.lr"),
    (["train.optimizer.lr=fast"], "train.optimizer.lr", "expected a number"),
    (["train.max_steps=1.5"], "train.max_steps", "integer"),
    (["train.ema.enabled=maybe"], "train.ema.enabled", "true or false"),
    (["data.latent_frames=10"], "data.latent_frames", "model.chunk_width"),
    (["parallel.tp=3"], "parallel", "world size"),
    (["data=latent"], "data.shards", "missing"),
    (["model=huge"], "model", "tiny"),
    (["modle=tiny"], "modle", "model"),
    (["model.attention_backend=magic"], "model.attention_backend", "reference"),
    (["train.flow.t_distribution=normal"], "train.flow.t_distribution", "logit_normal"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[b[1] + "-" + b[2].split()[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_field(overrides, key, hint, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    code = main(overrides + [f"output_dir={tmp_path}", "parallel.dp=-1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("config error: ") and key in err and hint in err, err
    assert not any(tmp_path.iterdir()), "a rejected config must not create the run directory"


def test_world_size_grid_check():
    cfg = load_config(["parallel.tp=2", "parallel.dp=-1", "model.num_attention_heads=4"])
    validate_config(cfg, world_size=4)
    with pytest.raises(ConfigError, match="parallel"):
        validate_config(cfg, world_size=3)


def test_finetune_doc_command_composes_for_eight_gpus():
    cfg = load_config(["experiment=finetune_4.5B", "name=my_finetune", "train.init_from=/ckpt/magi/4.5B_base",
                       "data.shards=/data/my_clips_latents", "train.max_steps=2000"])
    validate_config(cfg, world_size=8)
    assert cfg.model.num_layers == 34 and cfg.train.flow.t_distribution == "inference"
    assert cfg.parallel.resolved_dp(8) == 8 and cfg.train.checkpoint.export_at_end
