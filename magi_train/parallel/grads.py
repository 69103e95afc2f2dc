"""finalize_grads: the gradient reductions no data-parallel wrapper does, after each step's backward.

  TP-partial   replicated parameters a TP rank applies to its own heads (q/k norms) or, with sequence
               parallelism, to its own tokens (norms, adaLN gates): summed over the TP group
  KV replicas  KV-head weights held by tp/G ranks when tp exceeds the KV heads: summed over those ranks
  pipeline     embedders every pipeline stage holds: summed over the stages (and local virtual stages)
  DP/CP        only for dp_mode='none' (all-reduced here) and DDP with cp > 1 (block gradients x cp)
FSDP-sharded gradients are DTensors with the same sharding on every rank of these groups, so the local
shards are reduced in place."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def _local(g: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return g.to_local() if isinstance(g, DTensor) else g


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The local gradient, zeros if the parameter got none (every rank must join each collective)."""
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return _local(p.grad)


def _all_reduce_(t: torch.Tensor, group) -> None:
    buf = t.contiguous()
    if buf.device.type == "cpu" and dist.get_backend(group) == "nccl":
        buf = buf.cuda()   # FSDP CPU offload keeps gradients in host memory; NCCL reduces on the GPU
    dist.all_reduce(buf, group=group)
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf)


@dataclass
class GradSync:
    tp_group: object = None
    tp_partial: list = field(default_factory=list)
    kv_replicas: list = field(default_factory=list)        # [(group, [params])]
    pp_group: object = None
    pp_shared: list = field(default_factory=list)          # [[copies of one parameter on this rank]]
    cp_scale: float = 1.0
    cp_scaled: list = field(default_factory=list)          # DDP with cp > 1: block parameters
    manual_group: object = None                            # dp_mode='none': reduce over dp x cp here
    manual_block: list = field(default_factory=list)
    manual_rest: list = field(default_factory=list)
    manual_block_div: float = 1.0
    manual_rest_div: float = 1.0

    @torch.no_grad()
    def finalize(self) -> None:
        if self.manual_group is not None:
            for params, div in ((self.manual_block, self.manual_block_div), (self.manual_rest, self.manual_rest_div)):
                for p in params:
                    g = _grad(p)
                    _all_reduce_(g, self.manual_group)
                    g.div_(div)
        if self.cp_scale != 1.0:
            for p in self.cp_scaled:
                if p.grad is not None:
                    _local(p.grad).mul_(self.cp_scale)
        if self.tp_group is not None:
            for p in self.tp_partial:
                _all_reduce_(_grad(p), self.tp_group)
        for group, params in self.kv_replicas:
            for p in params:
                _all_reduce_(_grad(p), group)
        for copies in self.pp_shared:
            grads = [_grad(p) for p in copies]
            total = grads[0].clone()
            for g in grads[1:]:
                total += g
            if self.pp_group is not None:
                _all_reduce_(total, self.pp_group)
            for g in grads:
                g.copy_(total)


def _counts_here(name: str, grad: torch.Tensor, env, num_query_groups: int) -> bool:
    """Whether this rank's piece of `name`'s gradient enters the global norm: every element of the whole model
    once, so copies held by several ranks (replicated over TP, DDP/CP replicas, pipeline-shared embedders,
    KV heads beyond the KV-head count) count on one of them only."""
    from torch.distributed.tensor import DTensor

    from .pipeline import PIPELINE_SHARED_PREFIXES
    from .state_dict_adapter import param_role

    if name.startswith(PIPELINE_SHARED_PREFIXES) and env.pp_rank != 0:
        return False
    role = param_role(name)
    rep = max(1, env.tp // num_query_groups)
    if role is None and env.tp_rank != 0:
        return False
    if role in ("k", "v", "kv_xattn") and env.tp_rank % rep != 0:
        return False
    # FSDP gradients are shards over dp x cp; any other layout holds a whole copy on every dp x cp rank
    return isinstance(grad, DTensor) or env.dp_cp_rank == 0


@torch.no_grad()
def clip_grad_norm_(plan, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for any layout: the L2 norm of the whole model's gradient (each element
    counted once across tp/cp/pp/dp ranks, a collective over the world), and every trainable copy on this rank
    scaled by min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping (inf/nan: nothing scaled)."""
    env = plan.env
    counted: dict[tuple, list[torch.Tensor]] = {}
    for name, p in plan.named_parameters():
        if p.requires_grad and p.grad is not None and _counts_here(name, p.grad, env, plan.model_cfg.num_query_groups):
            g = _local(p.grad)
            counted.setdefault((g.device, g.dtype), []).append(g)
    # one pass over the gradients: a norm a tensor (foreach kernels, no squared copy), summed as squares
    total = torch.zeros((), dtype=torch.float32, device=env.device)
    for grads in counted.values():
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        total += torch.stack(norms).square().sum().to(total.device)
    if env.distributed:
        dist.all_reduce(total)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and norm == norm and norm != float("inf"):
        grads = [_local(p.grad) for ps in plan.shared_copies().values() for p in ps
                 if p.requires_grad and p.grad is not None]
        torch._foreach_mul_(grads, coef)
    return norm
