"""Exponential moving average of the trainable weights, kept in fp32 beside the model.

Keys are the model's clean parameter names (wrappers such as activation checkpointing or compile add prefixes
that are stripped), so the EMA state dict is the model's state dict shape and exports directly to MAGI-1.
In a parallel layout the EMA holds this rank's shard of each weight (what the rank's parameter holds: a TP
slice, an FSDP DTensor shard), passed in as (name, parameter) pairs."""
from __future__ import annotations

import torch
from torch import nn

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a DTensor's local shard (same storage: updated in place)."""
    return getattr(t, "_local_tensor", t)


class EMA:
    def __init__(self, model: nn.Module | None, decay: float, warmup: bool = True, named_parameters=None):
        """EMA of model's trainable parameters, or of `named_parameters` ((name, parameter) pairs) when given."""
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        named = model.named_parameters() if named_parameters is None else named_parameters
        self._params = {clean_name(n): p for n, p in named if p.requires_grad}
        self.shadow = {n: p.detach().float().clone() for n, p in self._params.items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        names = list(self.shadow)
        torch._foreach_lerp_([_local(self.shadow[n]) for n in names],
                             [_local(self._params[n].detach()).float() for n in names], 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise KeyError(f"EMA state: missing {sorted(missing)[:3]}")
        for n, v in sd["shadow"].items():
            if n in self.shadow:
                self.shadow[n].copy_(v)
        self.updates = int(sd["updates"])


__all__ = ["EMA", "clean_name"]
