"""Inference's place in the process grid (torchrun): the same layouts training uses, built by
magi_train.parallel.parallelize (model_build.py) without the data-parallel wrapper.

tp: megatron-core linears through the layer spec; cp: Ulysses sequence sharding (each rank keeps the KV cache of
its heads); pp: the blocks cut into stages, each forward passed stage to stage and its velocity broadcast, each
rank caching K/V of its own layers only, so a model and cache too large for one GPU fit over several. Every rank
runs the same chunk loop on the same seeded noise, rank 0 decodes and writes the video. Data parallelism has no
meaning for one prompt (dp must be 1). One process gets the trivial layout."""
from __future__ import annotations

import dataclasses
import os

import torch

from magi_train.config import ConfigError

from .config import InferConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_parallel(cfg: InferConfig) -> bool:
    p = cfg.parallel
    return world_size() > 1 or p.tp * p.cp * p.pp > 1


def single_process_env(device: torch.device):
    from magi_train.config.parallel_config import ParallelConfig
    from magi_train.parallel.env import ParallelEnv

    return ParallelEnv(pcfg=ParallelConfig(dp=1, dp_mode="none"), device=device)


def setup_parallel(cfg: InferConfig):
    """Process groups from torchrun's environment (world size must equal tp*cp*pp)."""
    from magi_train.parallel.env import init_parallel

    p = cfg.parallel
    if (p.pp > 1 or p.tp > 1) and cfg.fp8_quant:
        raise ConfigError("fp8_quant: fp8 checkpoints run with tp_size=1 and pp_size=1 (use cp_size, or the bf16 "
                          "checkpoint)")
    # no gradients at inference: the cp ranks must not be wrapped for data parallelism
    cfg.parallel = p = dataclasses.replace(p, dp=1, dp_mode="none", fsdp_cpu_offload=False,
                                           pp_microbatches=max(p.pp_microbatches, p.pp))
    if world_size() != p.tp * p.cp * p.pp:
        raise ConfigError(f"cp_size: tp*cp*pp = {p.tp * p.cp * p.pp} must equal torchrun's world size {world_size()}")
    p.validate_model(cfg.model)
    return init_parallel(p)
