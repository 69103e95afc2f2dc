"""Tensor parallelism through the layer spec: megatron-core Column/RowParallelLinear for the block linears.

Sharding (what rank r of tp holds; the state-dict adapter maps the full tp=1 weights onto it):
  q, qx            heads [r*H/tp, (r+1)*H/tp)                     (rows of the weight)
  k, v, kv_xattn   KV heads [r*G/tp, ...) if tp <= G; beyond G, KV head r // (tp/G), replicated on tp/G ranks
  fc1 (SwiGLU)     [gate rows of slice r | up rows of slice r], so the model's chunk(2) pairs them
  proj             input columns [self heads of r | cross heads of r]
  fc2              input columns of slice r
Replicated KV heads get partial gradients on each replica; finalize_grads sums them over the replica group."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region)
from torch import nn

from magi_train.config import ModelConfig

KV_ROLES = ("k", "v", "kv_xattn")


def _no_init(_w):  # weights are filled later (seeded init or a checkpoint), never by Megatron
    return None


class _TensorOut:
    """Megatron layers return (out, bias); the block wants the tensor. No `_extra_state` in the state dict."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self):
        self._load_state_dict_pre_hooks.clear()

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the block's fp32 LayerNorm output would reach Megatron's autograd function, whose
        # sequence-parallel backward reduce-scatters a gradient of the matmul's dtype into a buffer of the
        # input's dtype: cast first, as autocast would (it also halves what the linear keeps for backward).
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.weight.dtype
        return x if x.dtype == dtype else x.to(dtype)


class MagiColumnParallelLinear(_TensorOut, ColumnParallelLinear):
    def __init__(self, *args, role: str, kv_replicas: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()
        self.role = role
        self.kv_replicas = kv_replicas  # > 1: this rank's rows are one KV head shared with kv_replicas-1 ranks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cast(x)
        if x.dim() == 3:
            return super().forward(x)[0]
        # Megatron's backward assumes [s, b, h]; captions come as [B, n, L, C]
        out = super().forward(x.reshape(-1, 1, x.shape[-1]))[0]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @classmethod
    def fused_forward(cls, x: torch.Tensor, linears) -> list[torch.Tensor]:
        """Column linears of one input as one GEMM over their concatenated local weights, with one
        communication for all of them: the backward all-reduce of the input gradient (or, with sequence
        parallelism, one all-gather forward and one reduce-scatter backward) instead of one per linear."""
        first = linears[0]
        if any(m.sequence_parallel != first.sequence_parallel or m.tp_group is not first.tp_group for m in linears):
            return [m(x) for m in linears]
        x = first._cast(x)
        if first.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, group=first.tp_group)
        elif first.tp_group is not None and torch.distributed.get_world_size(first.tp_group) > 1:
            x = copy_to_tensor_model_parallel_region(x, group=first.tp_group)
        out = F.linear(x, torch.cat([m.weight for m in linears]))
        return list(out.split([m.weight.shape[0] for m in linears], dim=-1))


class MagiRowParallelLinear(_TensorOut, RowParallelLinear):
    def __init__(self, *args, role: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._drop_extra_state_hook()
        self.role = role

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self._cast(x))[0]


class MegatronSpec:
    """LayerSpec for megatron-core tensor parallelism (see magi_train/model/spec.py for the protocol)."""

    def __init__(self, cfg: ModelConfig, tp_group=None, tp_size: int | None = None, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32):
        import torch.distributed as dist

        self.cfg = cfg
        self.tp_group = tp_group
        self.tp_size = tp_size or (dist.get_world_size(tp_group) if tp_group is not None else 1)
        g = cfg.num_query_groups
        if not (g % self.tp_size == 0 or self.tp_size % g == 0):
            raise ValueError(f"parallel.tp: must divide num_query_groups={g} or be a multiple of it, "
                             f"got {self.tp_size}")
        if cfg.num_attention_heads % self.tp_size:
            raise ValueError(f"parallel.tp: must divide num_attention_heads={cfg.num_attention_heads}, "
                             f"got {self.tp_size}")
        self.kv_replicas = max(1, self.tp_size // g)
        common = dict(tensor_model_parallel_size=self.tp_size, use_cpu_initialization=True,
                      perform_initialization=False, params_dtype=params_dtype)
        self.config = ModelParallelConfig(sequence_parallel=sequence_parallel, **common)
        # captions are not sequence-sharded: their linear never takes part in sequence parallelism
        self.caption_config = ModelParallelConfig(sequence_parallel=False, **common)

    def column(self, in_features: int, out_features: int, role: str) -> nn.Module:
        config = self.caption_config if role == "kv_xattn" else self.config
        replicas = 1
        if role in KV_ROLES and self.kv_replicas > 1:
            # one KV head per rank: the layer's "full" output is tp heads wide, rank r holds head r // replicas
            per_head = out_features // self.cfg.num_query_groups
            out_features, replicas = per_head * self.tp_size, self.kv_replicas
        return MagiColumnParallelLinear(in_features, out_features, config=config, init_method=_no_init, bias=False,
                                        gather_output=False, skip_bias_add=True, tp_group=self.tp_group, role=role,
                                        kv_replicas=replicas)

    def row(self, in_features: int, out_features: int, role: str) -> nn.Module:
        return MagiRowParallelLinear(in_features, out_features, config=self.config, init_method=_no_init, bias=False,
                                     input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group, role=role)

    def local_heads(self, heads: int, role: str) -> int:
        if role == "kv":
            return max(1, heads // self.tp_size)
        return heads // self.tp_size
