"""MAGI-1's special conditioning tokens: learned caption-space vectors prepended to a caption's embedding.

The release ships them as an npz (example/assets/special_tokens.npz: caption_token [1, 4096], logo_token
[1, 4096], other_tokens [100, 4096]); the names below index that file as its inference code does. Duration
token N says N chunks remain (1..8).
"""
from __future__ import annotations

import numpy as np
import torch

_OTHER_TOKEN_ROWS = {
    "TRANS_TOKEN": 0, "HQ_TOKEN": 1, "STATIC_FIRST_FRAMES_TOKEN": 2, "DYNAMIC_FIRST_FRAMES_TOKEN": 3,
    "BORDERNESS_TOKEN": 4, "THREE_D_MODEL_TOKEN": 15, "TWO_D_ANIME_TOKEN": 16,
    **{f"DURATION_TOKEN_{n}": 6 + n for n in range(1, 9)},
}


def load_special_tokens(path: str) -> dict[str, torch.Tensor]:
    """name -> [1, D] float32 tensor."""
    with np.load(path) as data:
        for key in ("caption_token", "logo_token", "other_tokens"):
            if key not in data:
                raise KeyError(f"special token file {path} lacks the array {key!r}")
        tokens = {"CAPTION_TOKEN": data["caption_token"], "LOGO_TOKEN": data["logo_token"]}
        other = data["other_tokens"]
        tokens.update({name: other[row:row + 1] for name, row in _OTHER_TOKEN_ROWS.items()})
    return {name: torch.from_numpy(np.asarray(v, dtype=np.float32)) for name, v in tokens.items()}


def prepend_token(emb: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Put `token` [1, D] before every caption of emb [..., L, D] (mask [..., L] gets an 'on' in front); the
    length stays L, so the last token falls off. MAGI-1 rounds tokens through float16 first."""
    token = token.to(torch.float16).to(emb.dtype).to(emb.device)
    lead = token.expand(*emb.shape[:-2], 1, emb.shape[-1])
    emb = torch.cat([lead, emb], dim=-2)[..., : emb.shape[-2], :]
    if mask is not None:
        mask = torch.cat([torch.ones_like(mask[..., :1]), mask], dim=-1)[..., : mask.shape[-1]]
    return emb, mask
