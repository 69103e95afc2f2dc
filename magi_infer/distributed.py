"""Inference over several processes (torchrun): the parallel issue's layouts applied to the same model.

tp: megatron-core linears through MegatronSpec; cp: Ulysses sequence sharding (each rank keeps the KV cache of
its heads); every rank runs the same chunk loop on the same seeded noise, rank 0 decodes and writes the video.
Data parallelism has no meaning for one prompt (dp must be 1)."""
from __future__ import annotations

import os

import torch

from magi_train.config import ConfigError
from magi_train.model import build_dit

from .config import InferConfig


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_parallel(cfg: InferConfig) -> bool:
    p = cfg.parallel
    return world_size() > 1 or p.tp * p.cp * p.pp > 1


def setup_parallel(cfg: InferConfig):
    """Process groups from torchrun's environment (world size must equal tp*cp*pp)."""
    from magi_train.parallel.env import init_parallel

    p = cfg.parallel
    if p.pp > 1:
        raise ConfigError("pp_size: pipeline-parallel inference is not available yet (use cp_size / tp_size)")
    if world_size() != p.tp * p.cp * p.pp:
        raise ConfigError(f"cp_size: tp*cp*pp = {p.tp * p.cp * p.pp} must equal torchrun's world size {world_size()}")
    p.validate_model(cfg.model)
    return init_parallel(p)


def build_parallel_model(cfg: InferConfig, env, dtype: torch.dtype):
    """The DiT sharded for env (random weights are seeded, so every rank builds the same model)."""
    from magi_train.parallel.context_parallel import apply_context_parallel

    spec = None
    if env.tp > 1:
        from magi_train.parallel.megatron_spec import MegatronSpec

        spec = MegatronSpec(cfg.model, tp_group=env.tp_group, params_dtype=dtype)
    torch.manual_seed(cfg.seed)
    model = build_dit(cfg.model, spec=spec, device=env.device, dtype=dtype)
    if cfg.load is not None:
        from magi_train.model.checkpoint_io import load_magi_checkpoint

        if env.tp > 1:
            try:
                from magi_train.parallel.state_dict import load_magi_checkpoint_tp  # the parallel issue's adapter
            except ImportError:
                raise ConfigError("tp_size: loading a checkpoint into tensor-parallel shards needs "
                                  "magi_train.parallel.state_dict.load_magi_checkpoint_tp (not available yet)") from None
            load_magi_checkpoint_tp(model, cfg.load, env, fp8=cfg.fp8_quant, distill=cfg.model.distill)
        else:
            load_magi_checkpoint(model, cfg.load, fp8=cfg.fp8_quant, distill=cfg.model.distill, device=str(env.device))
    apply_context_parallel(model, env.cp_group, env.tp_group)
    return model.eval()
