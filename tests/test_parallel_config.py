"""ParallelConfig: one-line errors naming the field, world-size and model-shape checks."""
import pytest

from magi_train.config import ConfigError, model_preset
from magi_train.config.parallel_config import ParallelConfig


def test_defaults_fill_the_world_with_data_parallel():
    p = ParallelConfig(tp=2, cp=2)
    assert p.validate_world(8) == 2
    assert ParallelConfig().validate_world(1) == 1


@pytest.mark.parametrize("kwargs,field", [
    (dict(tp=0), "parallel.tp"),
    (dict(cp=-1), "parallel.cp"),
    (dict(dp=0), "parallel.dp"),
    (dict(pp_schedule="zero_bubble"), "parallel.pp_schedule"),
    (dict(cp_strategy="ring"), "parallel.cp_strategy"),
    (dict(dp_mode="zero3"), "parallel.dp_mode"),
    (dict(backend="mpi"), "parallel.backend"),
    (dict(pp_schedule="interleaved_1f1b", pp_virtual_stages=1), "parallel.pp_virtual_stages"),
    (dict(pp_virtual_stages=2), "parallel.pp_virtual_stages"),
    (dict(pp=4, pp_microbatches=2), "parallel.pp_microbatches"),
    (dict(dp_mode="ddp", fsdp_cpu_offload=True), "parallel.fsdp_cpu_offload"),
    (dict(sequence_parallel=True), "parallel.sequence_parallel"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ParallelConfig(**kwargs)
    msg = str(e.value)
    assert msg.startswith(field) and "\n" not in msg


def test_world_size_mismatch_names_the_product():
    with pytest.raises(ConfigError, match=r"parallel.dp: .*tp\*cp\*pp\*dp = 2\*1\*2\*3 = 12 .*world size 8"):
        ParallelConfig(tp=2, pp=2, dp=3).validate_world(8)
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelConfig(tp=3).validate_world(8)


def test_model_shape_checks():
    cfg = model_preset("24B")
    ParallelConfig(tp=8, cp=2).validate_model(cfg)              # 48 heads: 6 per TP rank, 3 per CP rank
    ParallelConfig(tp=16).validate_model(cfg)                   # beyond the 8 KV heads: replicated
    with pytest.raises(ConfigError, match="parallel.cp"):
        ParallelConfig(tp=8, cp=4).validate_model(cfg)          # 6 heads per TP rank do not split in 4
    with pytest.raises(ConfigError, match="parallel.tp"):
        ParallelConfig(tp=5).validate_model(cfg)
    with pytest.raises(ConfigError, match="parallel.pp"):
        ParallelConfig(pp=4, pp_microbatches=4).validate_model(model_preset("tiny"))  # 2 layers


def test_every_parallel_config_file_is_valid():
    from pathlib import Path

    import yaml

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "parallel").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        ParallelConfig(**(yaml.safe_load(f.read_text()) or {}))


def test_fsdp_cpu_offload_on_one_process_is_refused_not_ignored():
    # one process has no ranks to shard over, so FSDP2 is not applied: the offload would silently do nothing
    from magi_train.parallel.parallelize import parallelize

    with pytest.raises(ConfigError) as e:
        parallelize(model_preset("tiny"), ParallelConfig(fsdp_cpu_offload=True))
    msg = str(e.value)
    assert msg.startswith("parallel.fsdp_cpu_offload") and "dp*cp >= 2" in msg and "\n" not in msg
