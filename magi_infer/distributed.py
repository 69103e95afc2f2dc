"""Inference over several processes (torchrun): the parallel issue's layouts applied to the same model.

tp: megatron-core linears through MegatronSpec; cp: Ulysses sequence sharding (each rank keeps the KV cache of
its heads); pp: the blocks cut into stages (magi_train.parallel.parallelize), each forward passed stage to stage
and its velocity broadcast, each rank caching K/V of its own layers only, so a model and cache too large for one
GPU fit over several. Every rank runs the same chunk loop on the same seeded noise, rank 0 decodes and writes
the video. Data parallelism has no meaning for one prompt (dp must be 1)."""
from __future__ import annotations

import dataclasses
import os

import torch

from magi_train.config import ConfigError
from magi_train.dtypes import DTYPE_NAMES
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
    if p.pp > 1 and cfg.fp8_quant:
        raise ConfigError("pp_size: fp8 checkpoints (fp8_quant=true) run with pp_size=1 (use tp_size/cp_size, or "
                          "the bf16 checkpoint)")
    # no gradients at inference: the cp ranks must not be wrapped for data parallelism
    cfg.parallel = p = dataclasses.replace(p, dp=1, dp_mode="none", fsdp_cpu_offload=False,
                                           pp_microbatches=max(p.pp_microbatches, p.pp))
    if world_size() != p.tp * p.cp * p.pp:
        raise ConfigError(f"cp_size: tp*cp*pp = {p.tp * p.cp * p.pp} must equal torchrun's world size {world_size()}")
    p.validate_model(cfg.model)
    return init_parallel(p)


def build_parallel_model(cfg: InferConfig, env, dtype: torch.dtype):
    """The DiT sharded for env (random weights are seeded, so every rank builds the same model)."""
    from magi_train.parallel.context_parallel import apply_context_parallel

    if env.pp > 1:
        return _build_pipelined_model(cfg, env, dtype)

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


def _build_pipelined_model(cfg: InferConfig, env, dtype: torch.dtype):
    """This rank's pipeline stages (tp and cp inside them as configured), cfg.load read one tensor at a time;
    without a checkpoint, the random weights one process would draw with the same seed."""
    from magi_train.parallel import magi_tensor_getter, parallelize

    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: pipeline-parallel inference runs in float32 or bfloat16, got {dtype}")
    model_cfg = dataclasses.replace(cfg.model, params_dtype=DTYPE_NAMES[dtype])
    if cfg.load is not None:
        full_state = magi_tensor_getter(cfg.load, fp8=False, distill=cfg.model.distill)
    else:
        torch.manual_seed(cfg.seed)
        full_state = build_dit(cfg.model, device=env.device, dtype=dtype).state_dict()
    return parallelize(model_cfg, env=env, full_state=full_state, seed=cfg.seed).eval()
