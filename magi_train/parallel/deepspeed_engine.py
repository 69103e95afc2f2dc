"""DeepSpeed ZeRO (stage 1/2/3, CPU/NVMe offload, ZeRO++) as the data-parallel engine (parallel.dp_mode=deepspeed).

parallelize builds the rank's model as for every layout (TP, CP, freezing, recompute) and leaves the data-parallel
wrapper out; `attach` then hands the model and the run's AdamW to deepspeed.initialize, with our process groups
as DeepSpeed's mpu: its data-parallel group is our dp x cp group (as FSDP2's), its model-parallel group our TP
group, so ZeRO composes with megatron TP and Ulysses CP. DeepSpeed owns the gradient reduction, the gradient norm,
clipping (train.grad_clip) and the update; Magi keeps the accumulation loop, the lr schedule (it sets the lr of
the AdamW DeepSpeed steps), the EMA, checkpoints (deepspeed_state.py: the layout-independent format) and export.

Gradient reductions FSDP2 does not do either (grads.GradSync: TP-partial parameters, CP's block scale) run as
hooks on each parameter's gradient before it reaches DeepSpeed's reduce hooks, because ZeRO frees the
gradients it has reduced (no finalize after backward can see them).

deepspeed is an optional extra, imported here only: `pip install -e '.[deepspeed]'` (DS_BUILD_OPS=0: no compiled
ops are needed; the optimizer is torch's AdamW, so ZeRO-Offload runs without DeepSpeedCPUAdam)."""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.distributed as dist

from magi_train.config import ConfigError

log = logging.getLogger("magi_train")

INSTALL_HINT = "pip install -e '.[deepspeed]' (or DS_BUILD_OPS=0 pip install deepspeed)"


def import_deepspeed():
    """deepspeed, or one line saying how to install it."""
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"parallel.dp_mode: 'deepspeed' needs DeepSpeed, which is not importable ({e}); "
                          f"{INSTALL_HINT}") from None
    return deepspeed


def deepspeed_config(dcfg, grad_clip: float, micro_batch: int) -> dict:
    """parallel.deepspeed.* (or its config_file) + the keys Magi owns -> DeepSpeed's config dict."""
    user = dcfg.user_json()
    if user is not None:
        config = dict(user)
    else:
        zero = {"stage": dcfg.zero_stage, "overlap_comm": dcfg.overlap_comm, "contiguous_gradients": True,
                "reduce_bucket_size": dcfg.reduce_bucket_size}
        for key, device in (("offload_optimizer", dcfg.offload_optimizer), ("offload_param", dcfg.offload_param)):
            if device != "none":
                zero[key] = {"device": device, "pin_memory": True}
                if device == "nvme":
                    zero[key]["nvme_path"] = dcfg.nvme_path
        if dcfg.zero_stage == 3:
            zero.update(zero_quantized_weights=dcfg.zeropp_quantized_weights,
                        zero_hpz_partition_size=dcfg.zeropp_hpz_partition_size,
                        zero_quantized_gradients=dcfg.zeropp_quantized_gradients)
        config = {"zero_optimization": zero}
    # Magi drives accumulation (one engine.step per optimizer step, the boundary set per microbatch), so
    # DeepSpeed's own counter is 1; torch's AdamW stands in for DeepSpeed's compiled CPU Adam under offload
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                  gradient_clipping=float(grad_clip), zero_allow_untested_optimizer=True,
                  zero_force_ds_cpu_optimizer=False, steps_per_print=2**62, wall_clock_breakdown=False)
    return config


class ProcessGroups:
    """Our grid in the shape DeepSpeed asks an `mpu` for: data parallel = dp x cp, model parallel = TP."""

    def __init__(self, env):
        self.env = env
        self.dp_group = env.dp_cp_group if env.dp_cp_group is not None else _own_group(env, "dp_cp")
        self.tp_group = env.tp_group if env.tp_group is not None else _own_group(env, "tp")

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dp_group)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp_group)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.dp_group)

    def get_model_parallel_group(self):
        return self.tp_group

    get_tensor_model_parallel_group = get_model_parallel_group

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.tp_group)

    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_model_parallel_rank(self):
        return dist.get_rank(self.tp_group)

    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_process_group_ranks(self.tp_group)[0]

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def _own_group(env, kind: str):
    """The size-1 group of this dimension: megatron-core's when it built the grid, else the one-process world."""
    if env.distributed:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True) if kind == "dp_cp" else \
            ps.get_tensor_model_parallel_group()
    return dist.group.WORLD


def ensure_process_group(env) -> None:
    """DeepSpeed needs torch.distributed (and torchrun's LOCAL_RANK) even for one process: a one-rank group on a
    free local port."""
    for key, value in (("LOCAL_RANK", env.local_rank), ("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=env.device if backend == "nccl" else None)


def _install_pre_reduction_hooks(plan) -> None:
    """GradSync's reductions as gradient hooks (they run before DeepSpeed's reduce hooks, on every microbatch,
    in autograd's order, which is the same on every rank of a group); GradSync is left with nothing to do."""
    sync, env = plan.grad_sync, plan.env
    if sync.pp_shared:
        raise ConfigError("parallel.pp: dp_mode=deepspeed runs without pipeline stages; set parallel.pp=1")

    def all_reduce(group):
        def hook(g):
            g = g.contiguous()
            dist.all_reduce(g, group=group)
            return g
        return hook

    if sync.kv_replicas:   # DeepSpeed's norm would count replicated KV heads on every replica
        raise ConfigError(f"parallel.tp: dp_mode=deepspeed needs tp <= num_query_groups="
                          f"{plan.model_cfg.num_query_groups}, got {env.tp}")
    if sync.tp_group is not None:
        for p in sync.tp_partial:
            p.register_hook(all_reduce(sync.tp_group))
    sync.tp_partial = []
    # block parameters of a CP rank see only its tokens: DeepSpeed averages over dp x cp, the block
    # gradient must be the sum over CP averaged over dp (as FSDP2's divide factor of dp does)
    if env.cp > 1:
        from .parallelize import _BLOCK

        for name, p in plan.named_parameters():
            if name.startswith(_BLOCK) and p.requires_grad:
                p.register_hook(lambda g, cp=float(env.cp): g * cp)


def _mark_tensor_parallel(plan) -> None:
    """DeepSpeed's global norm counts a parameter on every TP rank when it is marked tensor-parallel and on TP
    rank 0 otherwise; mark exactly the parameters whose TP ranks hold different slices (grads._counts_here's
    rule), megatron-core's linears and ours alike."""
    from .state_dict_adapter import param_role

    if plan.env.tp == 1:
        return
    for name, p in plan.named_parameters():
        p.tensor_model_parallel = param_role(name) is not None


def attach(model, optimizer: torch.optim.Optimizer, dcfg, grad_clip: float, micro_batch: int):
    """deepspeed.initialize over this rank's model and the run's AdamW; the engine goes to plan.engine.
    The AdamW object stays the one the scheduler drives (DeepSpeed steps it on its flat partitions)."""
    deepspeed = import_deepspeed()
    plan = model.magi_parallel
    env = plan.env
    if plan.runner is not None or len(plan.shells) != 1:
        raise ConfigError("parallel.pp: dp_mode=deepspeed runs without pipeline stages; set parallel.pp=1")
    ensure_process_group(env)
    _install_pre_reduction_hooks(plan)
    _mark_tensor_parallel(plan)
    groups = ProcessGroups(env)
    config = deepspeed_config(dcfg, grad_clip, micro_batch)
    zero = config["zero_optimization"]
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if zero.get(key) and env.device.type != "cuda":
            name = "parallel.deepspeed." + ("config_file" if dcfg.config_file else key.replace("zero_", "zeropp_", 1))
            raise ConfigError(f"{name}: ZeRO++ quantization runs DeepSpeed's CUDA quantizer kernels; "
                              f"set it false on CPU (train.device={env.device.type})")
    with _quiet():
        engine, _, _, _ = deepspeed.initialize(model=plan.shells[0], optimizer=optimizer, config=config,
                                               mpu=groups, dist_init_required=False)
    plan.engine = engine
    plan.zero_stage = int(config["zero_optimization"]["stage"])
    plan.deepspeed_groups = groups
    log.info("DeepSpeed ZeRO-%d over %d data-parallel ranks (%s)", plan.zero_stage,
             groups.get_data_parallel_world_size(), type(engine.optimizer).__name__)
    return engine


@contextlib.contextmanager
def _quiet():
    """DeepSpeed logs its whole config at INFO on every rank: keep its logger at WARNING while it starts."""
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ds_logger.setLevel(level)


def forward_backward(engine, microbatches, loss_fn, autocast_dtype, forward_context):
    """grad_accumulation.accumulate_gradients through the engine: its forward (ZeRO-3 gathers), its backward
    (reduction at the boundary DeepSpeed is told of, the last microbatch)."""
    from magi_train.grad_accumulation import accumulate_gradients

    def boundary(last: bool):
        engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    return accumulate_gradients(engine, microbatches, loss_fn, autocast_dtype, boundary,
                                forward_context=forward_context,
                                backward=lambda loss: engine.backward(loss, scale_wrt_gas=False))


def optimizer_step(plan) -> tuple[float, bool]:
    """engine.step(): DeepSpeed's global gradient norm, clipping and update (skipped, norm inf, when the norm is
    not finite). Returns (norm before clipping, skipped). Drops the last checkpoint's gathered pieces."""
    engine = plan.engine
    plan._ds_pieces = None
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    skipped = not (norm == norm and norm != float("inf"))
    return norm, skipped


__all__ = ["import_deepspeed", "deepspeed_config", "ProcessGroups", "attach", "forward_backward",
           "optimizer_step", "INSTALL_HINT"]
