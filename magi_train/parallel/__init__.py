"""Megatron-style parallelism for the MAGI-1 DiT: tp / cp / pp / dp on one model definition, by config.

    env = init_parallel(cfg.parallel)                 # process groups (megatron-core parallel_state)
    model = parallelize(cfg.model, env=env)           # TP spec, PP stage, CP hooks, FSDP2/DDP
    loss = forward_backward(model, microbatches, loss_fn)
    magi_train.checkpoint.sharded.save(model, path, optimizer) / .load(...)   # any layout -> any layout
See docs/parallel.md."""
from .env import ParallelEnv, destroy_parallel, init_parallel
from .parallelize import ParallelPlan, PipelinedDiT, parallelize, plan_of
from .step import finalize_grads, forward_backward

__all__ = ["ParallelEnv", "ParallelPlan", "PipelinedDiT", "init_parallel", "destroy_parallel", "parallelize",
           "plan_of", "forward_backward", "finalize_grads"]
