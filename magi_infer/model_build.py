"""The DiT for inference, built by magi_train.parallel.parallelize, the builder training uses: this process's part
of the tp/cp/pp grid (one process: the trivial layout), without the data-parallel wrapper or training transforms.

Weights: cfg.load (a MAGI-1 directory, base or distill) read one tensor at a time into this rank's shard; without
load, the random weights one process draws with cfg.seed (so every layout runs the same model). The MAGI-1 fp8
format (fp8_quant) keeps its own loader, which swaps the block linears for Fp8Linear (tp = pp = 1; cp works)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from magi_train.config import ConfigError
from magi_train.dtypes import DTYPE_NAMES
from magi_train.model import build_dit

from .config import InferConfig

log = logging.getLogger("magi_infer")


def build_inference_dit(cfg: InferConfig, env, dtype: torch.dtype, full_state=None):
    """full_state: whole tensors (or name -> tensor) to use instead of cfg.load (a training checkpoint's weights)."""
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"dtype: inference runs in {', '.join(DTYPE_NAMES.values())}, got {dtype}")
    if cfg.fp8_quant:
        if full_state is not None:
            raise ConfigError("fp8_quant: the MAGI-1 fp8 format is read from load=DIR, not from training weights")
        return _fp8_dit(cfg, env, dtype)
    from magi_train.checkpoint.release_reader import magi_tensor_getter, one_process_state
    from magi_train.parallel import parallelize

    if full_state is None and cfg.load is not None:
        full_state = magi_tensor_getter(cfg.load, fp8=False, distill=cfg.model.distill)
    elif full_state is None:
        log.warning("load is not set: the DiT has random weights (fine for tests and benchmarks, not for videos)")
        full_state = one_process_state(cfg.model, cfg.seed, env.device, dtype)
    model_cfg = dataclasses.replace(cfg.model, params_dtype=DTYPE_NAMES[dtype])
    return parallelize(model_cfg, env=env, full_state=full_state, seed=cfg.seed).eval()


def _fp8_dit(cfg: InferConfig, env, dtype: torch.dtype):
    from magi_train.checkpoint.magi_format import load_magi_checkpoint
    from magi_train.parallel.context_parallel import apply_context_parallel

    if cfg.load is None:
        raise ConfigError("load: fp8_quant=true reads a MAGI-1 fp8 checkpoint; set load=DIR")
    model = build_dit(cfg.model, device="meta", dtype=dtype)
    load_magi_checkpoint(model, cfg.load, fp8=True, distill=cfg.model.distill, device=str(env.device))
    apply_context_parallel(model, env.cp_group, None)
    return model.to(env.device).eval()


__all__ = ["build_inference_dit"]
