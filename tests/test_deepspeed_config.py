"""parallel.dp_mode=deepspeed's config path: typed keys -> DeepSpeed's config dict, a user's json, and every bad
value stopped with one line naming the field. Runs without DeepSpeed installed (nothing here imports it), except
the missing-package line, which is checked by hiding it."""
import json
import sys

import pytest

from magi_train.config import ConfigError
from magi_train.config.deepspeed_config import DeepSpeedConfig
from magi_train.config.parallel_config import ParallelConfig
from magi_train.parallel.deepspeed_engine import deepspeed_config
from magi_train.training.config_loading import load_config


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_typed_keys_become_deepspeed_config():
    d = DeepSpeedConfig(zero_stage=3, offload_optimizer="nvme", offload_param="cpu", nvme_path="/nvme",
                        zeropp_quantized_weights=True, zeropp_hpz_partition_size=8, zeropp_quantized_gradients=True)
    c = deepspeed_config(d, grad_clip=0.5, micro_batch=2)
    z = c["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    assert z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert (z["zero_quantized_weights"], z["zero_hpz_partition_size"], z["zero_quantized_gradients"]) == (True, 8, True)
    assert c["gradient_clipping"] == 0.5 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["gradient_accumulation_steps"] == 1          # Magi drives the accumulation
    assert c["zero_force_ds_cpu_optimizer"] is False      # torch AdamW under offload, no compiled ops
    z2 = deepspeed_config(DeepSpeedConfig(), 1.0, 1)["zero_optimization"]
    assert z2["stage"] == 2 and "offload_param" not in z2 and "zero_quantized_weights" not in z2


def test_user_json_is_used_and_checked(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123}}))
    d = DeepSpeedConfig(config_file=str(good))
    assert d.stage == 3
    c = deepspeed_config(d, grad_clip=1.0, micro_batch=1)
    assert c["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 123}
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig(config_file=str(owned))
    assert _one_line(e).startswith("parallel.deepspeed.config_file:") and "train.optimizer" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        DeepSpeedConfig(config_file=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable json"):
        DeepSpeedConfig(config_file=str(tmp_path / "bad.json"))
    (tmp_path / "nostage.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError, match="stage 1, 2 or 3"):
        DeepSpeedConfig(config_file=str(tmp_path / "nostage.json"))
    with pytest.raises(ConfigError, match="either parallel.deepspeed.config_file or the typed keys"):
        DeepSpeedConfig(config_file=str(good), zero_stage=3)


@pytest.mark.parametrize("kwargs, field", [
    ({"zero_stage": 4}, "parallel.deepspeed.zero_stage"),
    ({"offload_optimizer": "disk"}, "parallel.deepspeed.offload_optimizer"),
    ({"offload_param": "cpu"}, "parallel.deepspeed.offload_param"),               # needs stage 3
    ({"zero_stage": 3, "offload_param": "nvme"}, "parallel.deepspeed.nvme_path"),  # nvme needs a path
    ({"nvme_path": "/x"}, "parallel.deepspeed.nvme_path"),                          # a path without nvme
    ({"reduce_bucket_size": 0}, "parallel.deepspeed.reduce_bucket_size"),
    ({"zeropp_quantized_weights": True}, "parallel.deepspeed.zeropp_quantized_weights"),
    ({"zeropp_quantized_gradients": True}, "parallel.deepspeed.zeropp_quantized_gradients"),
    ({"zeropp_hpz_partition_size": 2}, "parallel.deepspeed.zeropp_hpz_partition_size"),
    ({"zero_stage": 3, "zeropp_hpz_partition_size": 0}, "parallel.deepspeed.zeropp_hpz_partition_size"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DeepSpeedConfig(**kwargs)
    assert _one_line(e).startswith(field + ":"), str(e.value)


def test_entry_point_keys_and_cross_section_checks():
    cfg = load_config(["experiment=smoke", "parallel.dp_mode=deepspeed", "parallel.deepspeed.zero_stage=3",
                       "parallel.deepspeed.offload_optimizer=cpu"])
    assert cfg.parallel.deepspeed.zero_stage == 3 and cfg.parallel.deepspeed.offload_optimizer == "cpu"
    from magi_train.config import validate_config

    validate_config(cfg, 1)
    with pytest.raises(ConfigError) as e:
        load_config(["experiment=smoke", "parallel.deepspeed.zero_stage=3"])     # dp_mode is fsdp
    assert _one_line(e).startswith("parallel.deepspeed:")
    with pytest.raises(ConfigError) as e:
        load_config(["experiment=smoke", "parallel.dp_mode=deepspeed", "parallel.deepspeed.stage=3"])
    assert "parallel.deepspeed.stage: unknown key" in _one_line(e) and "zero_stage" in str(e.value)
    for extra, field in ((["parallel.pp=2"], "parallel.pp"), (["train.compile=true"], "train.compile"),
                         (["parallel.deepspeed.zero_stage=3", "parallel.deepspeed.offload_param=nvme",
                           "parallel.deepspeed.nvme_path=/nvme", "train.ema.enabled=true"], "train.ema.enabled")):
        cfg = load_config(["experiment=smoke", "parallel.dp_mode=deepspeed", *extra])
        with pytest.raises(ConfigError) as e:
            validate_config(cfg, cfg.parallel.pp)
        assert _one_line(e).startswith(field + ":"), str(e.value)
    assert ParallelConfig(dp_mode="deepspeed").deepspeed == DeepSpeedConfig()


def test_missing_deepspeed_is_one_line(monkeypatch):
    from magi_train.parallel.deepspeed_engine import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)    # import deepspeed -> ImportError
    with pytest.raises(ConfigError) as e:
        import_deepspeed()
    assert _one_line(e).startswith("parallel.dp_mode: 'deepspeed' needs DeepSpeed") and "pip install" in str(e.value)
