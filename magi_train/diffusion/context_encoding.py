"""How clean context chunks (a V2V prefix, a finished chunk re-run at clean_t) are encoded: the one definition
magi_infer serves with and training trains with, so a model learns on the inputs it is served.

MAGI-1 gives them the null caption; their adaLN flag is the one of the pass whose K/V the cache keeps:
  served under CFG (cfg_number 2, 3: base models)   the null-prompt pass writes the cache   -> 'dropped'
  served at cfg 1 (distilled models)                the prompt pass is the only pass         -> 'kept'
(base pre-training, train.flow.null_caption_on_clean, and the distillation teacher are the CFG case; the
distilled student is the cfg-1 case.)"""
from __future__ import annotations

import torch

__all__ = ["context_dropped", "context_flags"]


def context_dropped(cfg_number: int) -> bool:
    """The adaLN flag of clean context chunks served at cfg_number: True = 'dropped', False = 'kept'."""
    return cfg_number > 1


def context_flags(clean: torch.Tensor, dropped: torch.Tensor, cfg_number: int):
    """clean [B, n] (chunks given as clean context), dropped [B] (caption dropout per sample) -> the model's
    (caption_dropped [B, n], caption_null [B, n] or None): context chunks see the null caption under the flag
    of cfg_number's serving; the other chunks their sample's caption and flag."""
    per_sample = dropped[:, None].expand_as(clean)
    if context_dropped(cfg_number):
        return per_sample | clean, None
    return per_sample.clone(), clean.clone()
