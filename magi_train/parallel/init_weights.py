"""Fill a model built on the meta device, one parameter at a time, reproducibly in any layout.

Each tensor is drawn from its own generator seeded by (seed, name, TP rank for TP-sharded tensors), so
replicated tensors are equal on every rank without communication and TP shards differ from each other.
Distributions follow magi_train.model.dit.init_weights (truncated normal linears, zero biases, zero-centred
norms, zero final projection) and the embedders' own constructors."""
from __future__ import annotations

import zlib

import torch
from torch import nn

from magi_train.model.norms import LayerNorm1p
from magi_train.model.rope import LearnableRope3D

from .state_dict_adapter import param_role


def _generator(seed: int, name: str, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(f"{seed}/{name}/{rank}".encode()) + (seed << 32))
    return g


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device, seed: int = 0, tp_rank: int = 0, std: float = 0.02,
                prefix: str = "") -> nn.Module:
    """to_empty(device) then initialise every parameter; buffers (none in MagiDiT) are zeroed."""
    module.to_empty(device=device)
    for mname, m in module.named_modules():
        full = f"{prefix}{mname}" if mname else prefix.rstrip(".")
        if isinstance(m, LearnableRope3D):
            ref = LearnableRope3D(8 * m.num_bands, m.reference_tokens)
            m.bands.copy_(ref.bands.to(m.bands.dtype))
        elif isinstance(m, LayerNorm1p):
            m.weight.fill_(0.0 if m.zero_centered else 1.0)
            m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        elif hasattr(m, "null_caption_embedding"):
            p = m.null_caption_embedding
            name = f"{full}.null_caption_embedding"
            p.copy_(torch.randn(p.shape, generator=_generator(seed, name, 0, p.device), device=p.device,
                                dtype=torch.float32).mul_(0.02).to(p.dtype))
        weight = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if weight is not None and weight.dim() >= 2:
            name = f"{full}.weight"
            rank = tp_rank if param_role(name) is not None else 0
            tmp = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            nn.init.trunc_normal_(tmp, std=std, a=-3 * std, b=3 * std,
                                  generator=_generator(seed, name, rank, weight.device))
            weight.copy_(tmp)
            bias = m._parameters.get("bias")
            if bias is not None:
                bias.zero_()
        elif weight is None and isinstance(getattr(m, "bias", None), nn.Parameter) and not isinstance(m, LayerNorm1p):
            m.bias.zero_()
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        if name.endswith("final_linear.linear.weight"):
            p.zero_()
    for b in module.buffers():
        b.zero_()
    return module
