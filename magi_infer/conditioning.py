"""What a generation is conditioned on, in latent space: per-chunk captions and pinned prefix latents.

T2V, I2V and V2V differ only here: I2V pins one image latent frame at the start (kept in the output), V2V pins the
prefix video's latent frames (its whole chunks are cached as clean chunks, the rest overwritten at every step,
none of it emitted again). Chunk-wise prompts: prompt k applies from chunk starts[k] (counted from the first
generated chunk) until the next start. Special tokens are MAGI-1's learned caption-space vectors prepended to
captions; a duration token per chunk tells how many chunks remain."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from magi_train.encoders import load_special_tokens, prepend_token

DURATION_TOKEN = "DURATION_TOKEN"
MAX_DURATION_TOKEN = 8
# MAGI-1 run.sh switches its tokens on with environment variables, in this order; DURATION_TOKEN comes last.
SPECIAL_TOKEN_ENV = (("PAD_STATIC", "STATIC_FIRST_FRAMES_TOKEN"), ("PAD_DYNAMIC", "DYNAMIC_FIRST_FRAMES_TOKEN"),
                     ("PAD_BORDERNESS", "BORDERNESS_TOKEN"), ("PAD_HQ", "HQ_TOKEN"),
                     ("PAD_THREE_D_MODEL", "THREE_D_MODEL_TOKEN"), ("PAD_TWO_D_ANIME", "TWO_D_ANIME_TOKEN"),
                     ("PAD_DURATION", DURATION_TOKEN))


@dataclass
class Conditioning:
    caption: torch.Tensor                 # [B, n_generated, L, D] one caption per generated chunk
    caption_mask: torch.Tensor            # [B, n_generated, L] bool
    prefix: torch.Tensor | None = None    # [B, C, P, h, w] latent frames pinned at the start of the video
    emit_prefix: bool = False             # I2V: the image frame belongs to the output; V2V: the prefix does not
    null_prefix: torch.Tensor | None = None  # [k, D] negative special tokens before the null caption (NEG_PROMPT)

    @property
    def batch(self) -> int:
        return self.caption.shape[0]

    @property
    def prefix_frames(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[2]


# MAGI-1 run.sh's NEG_PROMPT=1 puts these in front of the null caption (the negative prompt), in this order.
NEGATIVE_SPECIAL_TOKENS = ("CAPTION_TOKEN", "LOGO_TOKEN", "TRANS_TOKEN", "BORDERNESS_TOKEN")


def negative_tokens_from_env() -> list[str]:
    """MAGI-1's negative special tokens when NEG_PROMPT is on, else none."""
    return list(NEGATIVE_SPECIAL_TOKENS) if os.environ.get("NEG_PROMPT", "").lower() in {"1", "true", "yes", "on"} else []


def null_caption_prefix(tokens: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor | None:
    """[k, D] tokens to stand before the null caption: each name goes in front of the previous ones and is rounded
    through float16, as MAGI-1 pads its null embedding; the caller cuts back to the caption length."""
    prefix = None
    for name in names:
        if name not in tokens:
            raise ValueError(f"negative_special_tokens: unknown token {name!r}; accepted names are {', '.join(sorted(tokens))}")
        tok = tokens[name].reshape(1, -1).to(torch.float16).float()
        prefix = tok if prefix is None else torch.cat([tok, prefix])
    return prefix


def special_tokens_from_env() -> list[str]:
    """Token names MAGI-1's run scripts select with PAD_* environment variables (PAD_HQ=1, PAD_DURATION=1)."""
    on = {"1", "true", "yes", "on"}
    return [name for var, name in SPECIAL_TOKEN_ENV if os.environ.get(var, "").lower() in on]


def prompt_of_chunk(starts: Sequence[int], num_chunks: int) -> list[int]:
    """Index of the prompt each generated chunk uses, for prompts starting at chunks `starts`."""
    starts = list(starts)
    if not starts or starts[0] != 0:
        raise ValueError(f"prompt_start_chunks: the first prompt must start at chunk 0, got {starts}")
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"prompt_start_chunks: must be strictly increasing, got {starts}")
    if starts[-1] >= num_chunks:
        raise ValueError(f"prompt_start_chunks: chunk {starts[-1]} is past the last generated chunk ({num_chunks - 1})")
    return [sum(1 for s in starts if s <= c) - 1 for c in range(num_chunks)]


def fit_caption_length(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (masked-off zeros) or cut captions [..., L, D] to `length` tokens (the DiT's caption_max_length)."""
    L = emb.shape[-2]
    if L > length:
        return emb[..., :length, :], mask[..., :length]
    if L < length:
        emb = torch.cat([emb, emb.new_zeros(*emb.shape[:-2], length - L, emb.shape[-1])], dim=-2)
        mask = torch.cat([mask.bool(), mask.new_zeros(*mask.shape[:-1], length - L).bool()], dim=-1)
    return emb, mask.bool()


def apply_special_tokens(caption: torch.Tensor, mask: torch.Tensor, tokens: dict[str, torch.Tensor],
                         names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the named tokens to per-chunk captions [B, n, L, D] in order (each goes in front of the previous
    ones, as MAGI-1 does). DURATION_TOKEN gives chunk i of n the token for min(n - i, 8)."""
    for name in names:
        if name == DURATION_TOKEN:
            n = caption.shape[1]
            parts = [prepend_token(caption[:, i:i + 1], mask[:, i:i + 1],
                                   tokens[f"DURATION_TOKEN_{min(n - i, MAX_DURATION_TOKEN)}"]) for i in range(n)]
            caption = torch.cat([p[0] for p in parts], dim=1)
            mask = torch.cat([p[1] for p in parts], dim=1)
        else:
            if name not in tokens:
                raise ValueError(f"special_tokens: unknown token {name!r}; accepted names are "
                                 f"{', '.join(sorted(tokens))}, {DURATION_TOKEN}")
            caption, mask = prepend_token(caption, mask, tokens[name])
    return caption, mask


def chunk_captions(emb: torch.Tensor, mask: torch.Tensor, starts: Sequence[int], num_chunks: int, length: int,
                   special_tokens_path: str | None = None, special_tokens: Sequence[str] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded prompts (emb [P, L, D], mask [P, L]) -> per-chunk captions [1, num_chunks, length, D].

    Special tokens are applied only when a token file is given (the release's tokens are not redistributed)."""
    if emb.shape[0] != len(starts):
        raise ValueError(f"prompts: {emb.shape[0]} prompts but {len(starts)} start chunks")
    emb, mask = fit_caption_length(emb.float(), mask, length)
    index = torch.tensor(prompt_of_chunk(starts, num_chunks))
    caption, cmask = emb[index][None], mask[index][None]
    if special_tokens_path and special_tokens:
        caption, cmask = apply_special_tokens(caption, cmask, load_special_tokens(special_tokens_path),
                                              list(special_tokens))
    return caption, cmask
