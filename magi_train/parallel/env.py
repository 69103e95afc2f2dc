"""The process grid: megatron-core parallel_state builds the tp/cp/pp/dp groups; ParallelEnv carries them.

Rank order is Megatron's "tp-cp-ep-dp-pp" (tp fastest), so a TP group sits inside one node whenever
tp <= GPUs per node. World size 1 works without torch.distributed."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from magi_train.config.parallel_config import ParallelConfig


@dataclass
class ParallelEnv:
    """Where this process sits in the grid, and the groups it talks over (None where the size is 1)."""

    pcfg: ParallelConfig
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    cp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: object = None
    cp_group: object = None
    pp_group: object = None
    dp_group: object = None
    dp_cp_group: object = None   # data parallel with context parallel: gradient reduction / FSDP sharding
    tp_cp_group: object = None   # every rank holding one sample's sequence shards
    pp_ranks: tuple = (0,)       # global ranks of this rank's pipeline, by stage

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_cp_rank(self) -> int:
        return dist.get_rank(self.dp_cp_group) if self.dp_cp_group is not None else 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} tp {self.tp_rank}/{self.tp} cp {self.cp_rank}/{self.cp} "
                f"pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} on {self.device}")


def _resolve_backend(pcfg: ParallelConfig) -> str:
    if pcfg.backend != "auto":
        return pcfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(pcfg: ParallelConfig) -> ParallelEnv:
    """Initialise torch.distributed (from torchrun's env) and megatron-core's model-parallel groups."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dp = pcfg.validate_world(world_size)
    backend = _resolve_backend(pcfg)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1 and not dist.is_initialized():
        return ParallelEnv(pcfg=pcfg, device=device, local_rank=local_rank)

    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=pcfg.tp, pipeline_model_parallel_size=pcfg.pp,
                                 context_parallel_size=pcfg.cp, order="tp-cp-ep-dp-pp",
                                 create_gloo_process_groups=False)

    def grp(g, size):
        return g if size > 1 else None

    pp_group = ps.get_pipeline_model_parallel_group()
    return ParallelEnv(
        pcfg=pcfg, world_size=world_size, rank=dist.get_rank(), local_rank=local_rank, device=device,
        tp=pcfg.tp, cp=pcfg.cp, pp=pcfg.pp, dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=grp(ps.get_tensor_model_parallel_group(), pcfg.tp),
        cp_group=grp(ps.get_context_parallel_group(), pcfg.cp),
        pp_group=grp(pp_group, pcfg.pp),
        dp_group=grp(ps.get_data_parallel_group(), dp),
        dp_cp_group=grp(ps.get_data_parallel_group(with_context_parallel=True), dp * pcfg.cp),
        tp_cp_group=grp(ps.get_tensor_and_context_parallel_group(), pcfg.tp * pcfg.cp),
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)) if pcfg.pp > 1 else (dist.get_rank(),),
    )


def destroy_parallel(env: ParallelEnv | None = None, *, process_group: bool = True) -> None:
    """Tear the groups down (tests re-initialise other layouts in the same processes with process_group=False)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: bool, device=None) -> bool:
    """True when `flag` is true on any rank (a collective when distributed; the flag itself for one process).
    device: where the reduction runs (default: the current CUDA device under NCCL, else the CPU)."""
    if not dist.is_initialized():
        return flag
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)
