"""The null caption as MAGI-1's DiT defines it.

The null caption is not the encoding of an empty string: it is the DiT's learned parameter
`y_embedder.null_caption_embedding` [caption_max_length, caption_channels], attended through a mask whose first
50 tokens are on (MAGI-1's inference builds it that way for the unconditional CFG pass). Caption dropout in
training and the unconditional pass at inference both swap (emb, mask) for it; clean (cached) chunks at
inference see it with an all-off mask. A caption whose mask is all off means "use the null caption".
"""
from __future__ import annotations

import torch

NULL_CAPTION_TOKENS = 50


def null_caption_mask(batch: int, length: int, tokens: int = NULL_CAPTION_TOKENS,
                      device: str | torch.device | None = None) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, :tokens] = True
    return mask


def substitute_null_caption(emb: torch.Tensor, mask: torch.Tensor, use_null: torch.Tensor,
                            null_embedding: torch.Tensor, tokens: int = NULL_CAPTION_TOKENS
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows where use_null [B] is True get the null caption (emb [B, L, D], mask [B, L]).

    null_embedding is the DiT's [L, D] parameter; the result keeps its gradient, so training learns it."""
    if null_embedding.shape != emb.shape[1:]:
        raise ValueError(f"null caption embedding {tuple(null_embedding.shape)} does not match captions "
                         f"{tuple(emb.shape[1:])}: text_encoder.max_length/dim must equal the DiT's "
                         f"caption_max_length/caption_channels")
    pick = use_null.to(emb.device).bool()
    emb = torch.where(pick[:, None, None], null_embedding.to(emb.dtype)[None], emb)
    null_mask = null_caption_mask(emb.shape[0], emb.shape[1], tokens, emb.device)
    mask = torch.where(pick[:, None], null_mask, mask.bool())
    return emb, mask


def is_null_caption(mask: torch.Tensor) -> torch.Tensor:
    """[B] True where a caption's mask is all off (MAGI-1's signal to use the null caption)."""
    return ~mask.bool().any(dim=-1)
