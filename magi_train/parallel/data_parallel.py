"""Data parallelism over the data x context-parallel ranks: FSDP2 (fully_shard, optional CPU offload) or DDP.

Gradient scale. The block parameters of a context-parallel rank see only its share of the sequence, so their
gradients are partial sums over the CP group; everything outside the blocks (embedders, final layer) sees
the whole sequence (comm.py makes its gradients complete on every rank). Reducing over dp x cp with a sum
therefore needs a divisor of dp for block parameters and dp*cp for the rest, which FSDP2 takes per
fully_shard unit (set_gradient_divide_factor); DDP averages by dp*cp and finalize_grads multiplies the block
gradients by cp."""
from __future__ import annotations

from torch import nn

from .state_dict_adapter import param_role

# FSDP shards these on dim 1 (input features) so that every shard of every layout is one box of the
# checkpoint's canonical view (KV heads and SwiGLU halves stay whole along dim 0).
_DIM1_ROLES = ("k", "v", "kv_xattn")


def fsdp_shard_dim(name: str, cfg) -> int:
    role = param_role(name)
    if role in _DIM1_ROLES or (role == "fc1" and cfg.gated_linear_unit):
        return 1
    return 0


def _mesh(env):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(env.dp_cp_group, env.device.type)


def apply_fsdp(root: nn.Module, layers: list[nn.Module], env, cfg, *, cpu_offload: bool = False,
               mp_policy=None, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each transformer layer, then the root (embedders, final layer) over the dp x cp group."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mesh = _mesh(env)
    names = {id(p): n for n, p in root.named_parameters()}

    def placement(p):
        return Shard(fsdp_shard_dim(names.get(id(p), ""), cfg))

    kw = dict(mesh=mesh, shard_placement_fn=placement, reshard_after_forward=reshard_after_forward,
              mp_policy=mp_policy or MixedPrecisionPolicy(),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    gloo = env.device.type == "cpu"   # gloo has no PREMUL_SUM/AVG: sum, then divide
    # FSDP2 all-gathers one dtype per unit: the final norm (in the blocks' dtype, bf16 on GPU) gets its own
    # unit, so the root keeps the fp32 islands (embedders, RoPE, final linear) together
    final = [m for n, m in root.named_modules() if n.endswith("videodit_blocks.final_layernorm")]
    units = [(layer, env.dp) for layer in layers] + [(m, env.dp * env.cp) for m in final] + [(root, env.dp * env.cp)]
    for unit, factor in units:
        fully_shard(unit, **kw)
        unit.set_gradient_divide_factor(float(factor))
        if gloo:
            unit.set_force_sum_reduction_for_comms(True)
    return root


def apply_ddp(module: nn.Module, env) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, process_group=env.dp_cp_group, device_ids=device_ids,
                                   broadcast_buffers=False)
