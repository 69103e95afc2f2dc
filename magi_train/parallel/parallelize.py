"""parallelize(model_cfg, pcfg, env): build the MagiDiT for this rank's place in the grid. The one place where
layer spec, TP, CP, PP, freezing, recompute, compile, fp8 and sharding are applied, for training (one process
is the trivial layout) and inference alike (inference passes no transforms and dp=1).

Fixed order, from the outside of the model (the model file holds no parallel code):
  1. layer spec (model.layer_spec) -> tensor parallel: the blocks built on the meta device with the spec's linears
  2. context parallel: the sequence sharding hook and Ulysses attention cores (and sequence parallelism)
  3. pipeline cut: this rank's stage(s) keep their layers, placeholders stand for the others
  4. materialise on the device: seeded init, or this rank's shard of full (tp=1) weights
  5. ModelTransforms, per shell: freezing -> activation checkpointing -> compile -> model converters (fp8)
  6. FSDP2 / DDP over the dp x cp group (dp_mode=deepspeed: no wrapper here; the training runtime hands the model
     and its optimizer to DeepSpeed, parallel/deepspeed_engine.py)
Returns the model (pp=1) or a PipelinedDiT; either carries `.magi_parallel`, the ParallelPlan."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config import ConfigError, ModelConfig
from magi_train.config.parallel_config import ParallelConfig
from magi_train.dtypes import DTYPES
from magi_train.model.dit import MagiDiT, build_dit
from magi_train.precision.fp8_training import forward_context as fp8_forward_context

from .context_parallel import SequenceSharding, apply_context_parallel
from .data_parallel import apply_ddp, apply_fsdp
from .env import ParallelEnv, init_parallel
from .grads import GradSync
from .init_weights import materialize
from .pipeline import PIPELINE_SHARED_PREFIXES, PipelineRunner, pipeline_forward, split_layers, trim_to_stage
from .transforms import ModelTransforms, apply_transforms
from .state_dict_adapter import param_role, shard_state_dict

_QK_NORM = re.compile(r"\.self_attention\.(q|k)_layernorm(_xattn)?\.(weight|bias)$")
_BLOCK = "videodit_blocks.layers."


@dataclass
class ParallelPlan:
    env: ParallelEnv
    model_cfg: ModelConfig
    shells: list[MagiDiT]                       # modules holding this rank's parameters under MAGI-1 names
    stage_ids: list[int]
    num_stages: int
    sharding: SequenceSharding
    grad_sync: GradSync
    runner: PipelineRunner | None = None
    fsdp_roots: list[nn.Module] = field(default_factory=list)
    forward_context: Callable | None = None     # () -> context every training forward runs in (TE's fp8_autocast)
    engine: object = None                       # dp_mode=deepspeed: the DeepSpeed engine (deepspeed_engine.attach)

    @property
    def pcfg(self) -> ParallelConfig:
        return self.env.pcfg

    def named_parameters(self):
        """(name, parameter) of this rank, each name once (pipeline-shared copies: the first shell's)."""
        seen = set()
        for shell in self.shells:
            for n, p in shell.named_parameters():
                if n not in seen:
                    seen.add(n)
                    yield n, p

    def shared_copies(self) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list] = {}
        for shell in self.shells:
            for n, p in shell.named_parameters():
                out.setdefault(n, []).append(p)
        return out


class PipelinedDiT(nn.Module):
    """This rank's pipeline stages. Training goes through forward_backward; calling it runs inference."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(stages)

    def forward(self, x, t, caption, caption_mask=None, caption_dropped=None, dt=None, **kwargs) -> torch.Tensor:
        """MagiDiT.forward's signature; every rank returns the velocity."""
        plan: ParallelPlan = self.magi_parallel
        model_kwargs = dict(x=x, t=t, caption=caption, caption_mask=caption_mask, caption_dropped=caption_dropped,
                            dt=dt, **kwargs)
        return pipeline_forward(plan.shells, plan.stage_ids, plan.num_stages, plan.env, plan.model_cfg, model_kwargs,
                                plan.sharding.shards)

    @property
    def cfg(self) -> ModelConfig:
        return self.magi_parallel.model_cfg

    @property
    def context_parallel(self):
        sharding = self.magi_parallel.sharding
        return sharding if sharding.shards > 1 else None

    def null_caption(self, *args, **kwargs):
        return self.magi_parallel.shells[0].null_caption(*args, **kwargs)


def _kv_replica_groups(env: ParallelEnv, replicas: int):
    """Process groups of the TP ranks sharing one KV head (every rank creates every group, in one order)."""
    mine = tuple(dist.get_process_group_ranks(env.tp_group))
    all_tp = [None] * env.world_size
    dist.all_gather_object(all_tp, mine)
    my_group = None
    for tp_ranks in sorted(set(all_tp)):
        for j in range(0, len(tp_ranks), replicas):
            ranks = list(tp_ranks[j:j + replicas])
            g = dist.new_group(ranks)
            if env.rank in ranks:
                my_group = g
    return my_group


def _grad_sync(env: ParallelEnv, shells: list[MagiDiT], cfg: ModelConfig, pcfg: ParallelConfig) -> GradSync:
    """Which parameters need which extra gradient reduction (see grads.py); built after FSDP wrapping."""
    sp = pcfg.sequence_parallel and env.tp > 1
    sync = GradSync(tp_group=env.tp_group, pp_group=env.pp_group)
    copies: dict[str, list] = {}                     # name -> this rank's copies (several: pipeline-shared)
    for shell in shells:
        for n, p in shell.named_parameters():
            copies.setdefault(n, []).append(p)
    for n, ps in copies.items():
        block = n.startswith(_BLOCK)
        if env.tp > 1 and (n == "rope.bands" or block and param_role(n) is None and (sp or _QK_NORM.search(n))):
            sync.tp_partial.extend(ps)
        if n.startswith(PIPELINE_SHARED_PREFIXES) and (env.pp > 1 or len(ps) > 1):
            sync.pp_shared.append(ps)
    if env.tp > cfg.num_query_groups:
        group = _kv_replica_groups(env, env.tp // cfg.num_query_groups)
        sync.kv_replicas.append((group, [ps[0] for n, ps in copies.items() if param_role(n) in ("k", "v", "kv_xattn")]))
    dpcp = env.dp * env.cp
    blocks = [ps[0] for n, ps in copies.items() if n.startswith(_BLOCK)]
    if dpcp > 1 and pcfg.dp_mode == "ddp" and env.cp > 1:
        sync.cp_scale, sync.cp_scaled = float(env.cp), blocks
    if dpcp > 1 and pcfg.dp_mode == "none":
        sync.manual_group = env.dp_cp_group
        sync.manual_block = blocks
        sync.manual_rest = [p for n, ps in copies.items() if not n.startswith(_BLOCK) for p in ps]
        sync.manual_block_div, sync.manual_rest_div = float(env.dp), float(dpcp)
    return sync


def build_layer_spec(model_cfg: ModelConfig, env: ParallelEnv, sequence_parallel: bool, dtype: torch.dtype):
    """model.layer_spec -> the linears the blocks are built with. auto: megatron when tp > 1, else local."""
    name = model_cfg.layer_spec
    if name == "auto":
        name = "megatron" if env.tp > 1 else "local"
    if name == "local":
        if env.tp > 1:
            raise ConfigError(f"model.layer_spec: 'local' linears are not tensor parallel; with parallel.tp={env.tp} "
                              f"use 'auto', 'megatron' or 'te'")
        return None
    if name == "megatron":
        from .megatron_spec import MegatronSpec

        return MegatronSpec(model_cfg, env.tp_group, env.tp, sequence_parallel=sequence_parallel, params_dtype=dtype)
    from magi_train.precision.te_spec import TESpec

    return TESpec(env.tp_group, env.tp)


def parallelize(model_cfg: ModelConfig, pcfg: ParallelConfig | None = None, env: ParallelEnv | None = None, *,
                full_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None,
                seed: int = 0, transforms: ModelTransforms | None = None, mp_policy=None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Build this rank's model. full_state: full tp=1 weights (our layout; a mapping or name -> tensor) to shard
    into the layout; otherwise a seeded init, identical for any layout's replicated tensors. transforms: what
    training applies per shell before sharding (None: nothing, as inference wants)."""
    if env is None:
        env = init_parallel(pcfg or ParallelConfig())
    pcfg = env.pcfg
    pcfg.validate_model(model_cfg)
    sp = pcfg.sequence_parallel and env.tp > 1
    if sp and env.device.type != "cuda":
        raise ConfigError("parallel.sequence_parallel: megatron-core's sequence-parallel linears need CUDA; "
                          "set it false on CPU")
    if pcfg.fsdp_cpu_offload and env.dp * env.cp == 1:
        # FSDP2 wraps only when there are ranks to shard over: one process would silently offload nothing
        raise ConfigError("parallel.fsdp_cpu_offload: FSDP2 shards and offloads over the dp x cp ranks and this run "
                          "has one (dp=1, cp=1); launch dp*cp >= 2 processes, or on one GPU use "
                          "parallel.dp_mode=deepspeed with parallel.deepspeed.offload_optimizer=cpu")
    if pcfg.fsdp_cpu_offload and env.device.type != "cuda":
        raise ConfigError("parallel.fsdp_cpu_offload: offloads GPU parameters to CPU memory, needs CUDA; "
                          "set it false on CPU")
    dtype = DTYPES[model_cfg.params_dtype]
    spec = build_layer_spec(model_cfg, env, sp, dtype)
    virtual = pcfg.pp_virtual_stages if pcfg.pp_schedule == "interleaved_1f1b" else 1
    num_stages = env.pp * virtual
    stage_ids = [env.pp_rank + k * env.pp for k in range(virtual)]
    ranges = split_layers(model_cfg.num_layers, num_stages)

    shells, sharding = [], None
    for s in stage_ids:
        shell = build_dit(model_cfg, spec, device="meta", dtype=dtype)
        sharding = apply_context_parallel(shell, env.cp_group, env.tp_group if sp else None, sp)
        if num_stages > 1:
            trim_to_stage(shell, ranges[s], first=s == 0, last=s == num_stages - 1)
        materialize(shell, env.device, seed=seed, tp_rank=env.tp_rank)
        if full_state is not None:
            keys = list(shell.state_dict().keys())
            shell.load_state_dict(shard_state_dict(full_state, keys, model_cfg, env.tp, env.tp_rank), strict=True)
        if transforms is not None:
            apply_transforms(shell, transforms)
        shells.append(shell)

    plan = ParallelPlan(env=env, model_cfg=model_cfg, shells=shells, stage_ids=stage_ids, num_stages=num_stages,
                        sharding=sharding, grad_sync=None,
                        forward_context=fp8_forward_context(transforms.fp8) if transforms is not None else None)
    dpcp = env.dp * env.cp
    wrapped = []
    for shell in shells:
        unit = shell
        if dpcp > 1 and pcfg.dp_mode == "fsdp":
            unit = apply_fsdp(shell, shell.held_layers(), env, model_cfg, cpu_offload=pcfg.fsdp_cpu_offload,
                              mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
            plan.fsdp_roots.append(unit)
        elif dpcp > 1 and pcfg.dp_mode == "ddp":
            unit = apply_ddp(shell, env)
        wrapped.append(unit)
    # after wrapping: FSDP2 swaps every parameter for a sharded DTensor parameter
    plan.grad_sync = _grad_sync(env, shells, model_cfg, pcfg)
    if num_stages > 1:
        plan.runner = PipelineRunner(wrapped, shells, stage_ids, num_stages, env, model_cfg, pcfg.pp_schedule)
        model = PipelinedDiT(wrapped)
    else:
        model = wrapped[0]
    model.magi_parallel = plan
    return model


def plan_of(model: nn.Module) -> ParallelPlan | None:
    return getattr(model, "magi_parallel", None)
