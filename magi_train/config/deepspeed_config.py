"""DeepSpeedConfig: the parallel.deepspeed.* keys of parallel.dp_mode=deepspeed (DeepSpeed ZeRO as the
data-parallel engine), and the checks that span sections.

The typed keys cover ZeRO stage, offload and ZeRO++; `config_file` takes a team's own DeepSpeed json instead.
Magi owns what its other sections already say (optimizer, lr schedule, batch, clipping, precision), so a json
that sets those is refused with one line naming the Magi key to use."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from magi_train.errors import ConfigError, check, check_choice

OFFLOAD_DEVICES = ("none", "cpu", "nvme")

# DeepSpeed json keys that another Magi section owns -> that section's key
OWNED_JSON_KEYS = {
    "optimizer": "train.optimizer.*",
    "scheduler": "train.schedule.*",
    "train_batch_size": "data.batch_size and train.grad_accum_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "fp16": "train.precision (fp32 master weights, bf16 autocast)",
    "bf16": "train.precision (fp32 master weights, bf16 autocast)",
    "torch_autocast": "train.precision",
    "pipeline": "parallel.pp (DeepSpeed's pipeline engine is not used)",
    "managed_gradient_accumulation": "train.grad_accum_steps (Magi drives the accumulation)",
}


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2                      # 1: optimizer states, 2: + gradients, 3: + parameters partitioned
    offload_optimizer: str = "none"          # none | cpu | nvme: where the fp32 master weights + Adam moments live
    offload_param: str = "none"              # none | cpu | nvme: where ZeRO-3 keeps the partitioned weights
    nvme_path: str | None = None             # a directory on a local NVMe drive (offload ... = nvme)
    overlap_comm: bool = True                # overlap the gradient reduce with the backward
    reduce_bucket_size: int = 500_000_000    # elements per gradient reduction bucket
    zeropp_quantized_weights: bool = False   # ZeRO++ qwZ: int8 weight all-gather (zero_stage 3)
    zeropp_hpz_partition_size: int = 1       # ZeRO++ hpZ: secondary weight copy over this many ranks (zero_stage 3)
    zeropp_quantized_gradients: bool = False  # ZeRO++ qgZ: int4 gradient reduce-scatter (zero_stage 3)
    config_file: str | None = None           # a DeepSpeed json used instead of the keys above (zero_optimization ...)

    def __post_init__(self) -> None:
        p = "parallel.deepspeed"
        check_choice(self.zero_stage, f"{p}.zero_stage", (1, 2, 3))
        check_choice(self.offload_optimizer, f"{p}.offload_optimizer", OFFLOAD_DEVICES)
        check_choice(self.offload_param, f"{p}.offload_param", OFFLOAD_DEVICES)
        check(self.offload_param == "none" or self.zero_stage == 3, f"{p}.offload_param",
              f"offloads partitioned weights, needs zero_stage=3, got zero_stage={self.zero_stage}")
        nvme = "nvme" in (self.offload_optimizer, self.offload_param)
        check(not nvme or bool(self.nvme_path), f"{p}.nvme_path",
              "offload to nvme needs a directory on a local NVMe drive; set parallel.deepspeed.nvme_path=/local/nvme")
        check(self.nvme_path is None or nvme, f"{p}.nvme_path",
              "is used only with offload_optimizer=nvme or offload_param=nvme")
        check(isinstance(self.reduce_bucket_size, int) and self.reduce_bucket_size > 0, f"{p}.reduce_bucket_size",
              f"must be a positive integer, got {self.reduce_bucket_size!r}")
        check(isinstance(self.zeropp_hpz_partition_size, int) and self.zeropp_hpz_partition_size >= 1,
              f"{p}.zeropp_hpz_partition_size", f"must be a positive integer, got {self.zeropp_hpz_partition_size!r}")
        for name in ("zeropp_quantized_weights", "zeropp_quantized_gradients"):
            check(not getattr(self, name) or self.zero_stage == 3, f"{p}.{name}",
                  f"ZeRO++ works on partitioned weights, needs zero_stage=3, got zero_stage={self.zero_stage}")
        check(self.zeropp_hpz_partition_size == 1 or self.zero_stage == 3, f"{p}.zeropp_hpz_partition_size",
              f"ZeRO++ hpZ needs zero_stage=3, got zero_stage={self.zero_stage}")
        if self.config_file is not None:
            defaults = DeepSpeedConfig()
            changed = [f for f in ("zero_stage", "offload_optimizer", "offload_param", "nvme_path", "overlap_comm",
                                   "reduce_bucket_size", "zeropp_quantized_weights", "zeropp_hpz_partition_size",
                                   "zeropp_quantized_gradients") if getattr(self, f) != getattr(defaults, f)]
            check(not changed, f"{p}.{changed[0]}" if changed else p,
                  "set either parallel.deepspeed.config_file or the typed keys, not both")
            self.user_json()   # read and checked now: a bad file stops the run before anything starts

    def user_json(self) -> dict | None:
        """The config_file's json (checked: readable, a mapping, no key another Magi section owns)."""
        if self.config_file is None:
            return None
        key = "parallel.deepspeed.config_file"
        path = Path(self.config_file)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{key}: {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: {path} is not readable json ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{key}: {path} must hold a json object, got {type(values).__name__}")
        for k in values:
            if k in OWNED_JSON_KEYS:
                raise ConfigError(f"{key}: {path} sets {k!r}; Magi sets it from {OWNED_JSON_KEYS[k]}, remove it")
        zero = values.get("zero_optimization", {})
        if not isinstance(zero, dict) or zero.get("stage", 0) not in (1, 2, 3):
            raise ConfigError(f"{key}: {path} needs zero_optimization.stage 1, 2 or 3 "
                              f"(got {zero.get('stage') if isinstance(zero, dict) else zero!r})")
        return values

    @property
    def stage(self) -> int:
        user = self.user_json()
        return int(user["zero_optimization"]["stage"]) if user is not None else self.zero_stage


def validate_deepspeed(cfg) -> None:
    """Cross-section checks of parallel.dp_mode=deepspeed (one line naming the field)."""
    p = cfg.parallel
    if p.dp_mode != "deepspeed":
        return
    check(p.pp == 1, "parallel.pp", f"dp_mode=deepspeed runs without pipeline stages; set parallel.pp=1 "
                                    f"(or dp_mode=fsdp), got {p.pp}")
    check(p.tp <= cfg.model.num_query_groups, "parallel.tp",
          f"dp_mode=deepspeed needs tp <= num_query_groups={cfg.model.num_query_groups} (no replicated KV heads), "
          f"got {p.tp}")
    check(not cfg.train.compile, "train.compile", "is not supported with parallel.dp_mode=deepspeed; set it false")
    check(cfg.train.fp8 == "none", "train.fp8", "is not supported with parallel.dp_mode=deepspeed; set it 'none'")
    check(not (cfg.train.ema.enabled and p.deepspeed.offload_param == "nvme"), "train.ema.enabled",
          "the EMA reads each rank's weight partition, which parallel.deepspeed.offload_param=nvme keeps on disk; "
          "use offload_param=cpu or disable the EMA")


__all__ = ["DeepSpeedConfig", "OFFLOAD_DEVICES", "OWNED_JSON_KEYS", "validate_deepspeed"]
