"""ParallelConfig: the tp/cp/pp/dp grid and how each dimension runs (parallel.* keys)."""
from __future__ import annotations

from dataclasses import dataclass, field

from magi_train.errors import ConfigError, check, check_choice

from .deepspeed_config import DeepSpeedConfig

CP_STRATEGIES = ("ulysses",)
PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")
DP_MODES = ("fsdp", "ddp", "deepspeed", "none")
BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class ParallelConfig:
    tp: int = 1                      # tensor parallel (Megatron Column/RowParallelLinear)
    cp: int = 1                      # context parallel (Ulysses all-to-all over heads)
    pp: int = 1                      # pipeline stages (cut at block boundaries)
    dp: int = -1                     # data parallel; -1 = world_size / (tp*cp*pp)
    cp_strategy: str = "ulysses"     # K/V heads are all-gathered when cp > num_query_groups
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 4         # per optimizer step; must be >= pp for 1F1B
    pp_virtual_stages: int = 1       # model chunks per rank (interleaved_1f1b needs >= 2)
    dp_mode: str = "fsdp"            # FSDP2 fully_shard | DDP | deepspeed (ZeRO 1/2/3) | none (replicas kept equal by hand)
    fsdp_cpu_offload: bool = False
    sequence_parallel: bool = False  # Megatron sequence parallel inside the TP group
    backend: str = "auto"            # auto: nccl on GPU, gloo on CPU
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)   # dp_mode=deepspeed: ZeRO stage, offload

    def __post_init__(self) -> None:
        for f in ("tp", "cp", "pp", "pp_microbatches", "pp_virtual_stages"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"parallel.{f}: must be a positive integer, got {v!r}")
        dp = self.dp
        if not isinstance(dp, int) or isinstance(dp, bool) or (dp <= 0 and dp != -1):
            raise ConfigError(f"parallel.dp: must be a positive integer or -1 (the rest of the world size), got {dp!r}")
        check_choice(self.cp_strategy, "parallel.cp_strategy", CP_STRATEGIES)
        check_choice(self.pp_schedule, "parallel.pp_schedule", PP_SCHEDULES)
        check_choice(self.dp_mode, "parallel.dp_mode", DP_MODES)
        check_choice(self.backend, "parallel.backend", BACKENDS)
        if self.pp_schedule == "interleaved_1f1b":
            check(self.pp_virtual_stages >= 2, "parallel.pp_virtual_stages",
                  f"interleaved_1f1b needs >= 2 virtual stages per rank, got {self.pp_virtual_stages}")
        else:
            check(self.pp_virtual_stages == 1, "parallel.pp_virtual_stages",
                  f"only interleaved_1f1b uses virtual stages; got {self.pp_virtual_stages} with {self.pp_schedule!r}")
        if self.pp > 1 and self.pp_schedule in ("1f1b", "interleaved_1f1b"):
            check(self.pp_microbatches >= self.pp, "parallel.pp_microbatches",
                  f"{self.pp_schedule} needs at least pp={self.pp} microbatches, got {self.pp_microbatches}")
        check(not (self.fsdp_cpu_offload and self.dp_mode != "fsdp"), "parallel.fsdp_cpu_offload",
              f"needs dp_mode='fsdp', got dp_mode={self.dp_mode!r}")
        check(self.dp_mode == "deepspeed" or self.deepspeed == DeepSpeedConfig(), "parallel.deepspeed",
              f"is read only with dp_mode='deepspeed', got dp_mode={self.dp_mode!r}")
        check(not (self.sequence_parallel and self.tp == 1), "parallel.sequence_parallel", "needs tp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.cp * self.pp

    def resolved_dp(self, world_size: int) -> int:
        """dp with -1 replaced by the rest of the world size."""
        if self.dp != -1:
            return self.dp
        mp = self.model_parallel_size
        check(world_size % mp == 0, "parallel.dp",
              f"world size {world_size} is not divisible by tp*cp*pp={mp} (tp={self.tp}, cp={self.cp}, pp={self.pp})")
        return world_size // mp

    def validate_world(self, world_size: int) -> int:
        """Check tp*cp*pp*dp == world_size; returns the resolved dp."""
        dp = self.resolved_dp(world_size)
        total = self.model_parallel_size * dp
        check(total == world_size, "parallel.dp",
              f"tp*cp*pp*dp = {self.tp}*{self.cp}*{self.pp}*{dp} = {total} must equal the world size {world_size}")
        return dp

    def validate_model(self, model_cfg) -> None:
        """Checks that need the model's shape (heads, layers)."""
        h, g = model_cfg.num_attention_heads, model_cfg.num_query_groups
        check(h % self.tp == 0, "parallel.tp", f"must divide num_attention_heads={h}, got {self.tp}")
        check(g % self.tp == 0 or self.tp % g == 0, "parallel.tp",
              f"must divide num_query_groups={g} or be a multiple of it, got {self.tp}")
        check((h // self.tp) % self.cp == 0, "parallel.cp",
              f"must divide the heads per TP rank ({h}//tp={h // self.tp}), got {self.cp}")
        check(model_cfg.ffn_hidden_size % self.tp == 0, "parallel.tp",
              f"must divide ffn_hidden_size={model_cfg.ffn_hidden_size}, got {self.tp}")
        stages = self.pp * self.pp_virtual_stages
        check(model_cfg.num_layers >= stages, "parallel.pp",
              f"pp*pp_virtual_stages={stages} exceeds num_layers={model_cfg.num_layers}")


__all__ = ["ParallelConfig", "ConfigError", "CP_STRATEGIES", "PP_SCHEDULES", "DP_MODES", "BACKENDS"]
