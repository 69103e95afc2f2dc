"""HashTextEncoder: an offline caption encoder with no weights, for tests and the default demo.

Every word, character trigram and word pair maps to a fixed pseudo-random vector derived from blake2b (so the
embedding of a caption is the same on every machine and library version), plus a sinusoidal position code, as
the DiT's cross-attention has no positions of its own on text. Different captions get clearly different
embeddings; what the words mean is learned downstream by the DiT's caption projection. Chosen over a PyPI model
(the smallest sentence encoder wheel, all-MiniLM-L6-v2, is 83 MB) because the demo's captions are short
templated descriptions where identity and order of words is what matters.
"""
from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache

import numpy as np
import torch

from .config import TextEncoderConfig
from .text_base import TextEncoder

END_TOKEN = "</s>"
_TOKEN_PATTERN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\w\s]")
# Relative weights of the parts of a token vector (the word itself dominates).
_TRIGRAM_WEIGHT = 0.5
_PAIR_WEIGHT = 0.5
_POSITION_WEIGHT = 0.5


def tokenize(text: str) -> list[str]:
    return _TOKEN_PATTERN.findall(text.lower())


@lru_cache(maxsize=65536)
def hashed_vector(seed: int, dim: int, key: str) -> np.ndarray:
    """Uniform values of unit variance, a pure function of (seed, dim, key)."""
    words = []
    counter = 0
    while len(words) * 16 < dim:
        digest = hashlib.blake2b(f"{seed}|{dim}|{counter}|{key}".encode(), digest_size=64).digest()
        words.append(np.frombuffer(digest, dtype="<u4"))
        counter += 1
    unit = np.concatenate(words)[:dim].astype(np.float64) / 2.0 ** 32  # [0, 1)
    return ((unit * 2.0 - 1.0) * math.sqrt(3.0)).astype(np.float32)


def position_code(length: int, dim: int) -> np.ndarray:
    position = np.arange(length, dtype=np.float64)[:, None]
    freqs = np.exp(-math.log(1000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)
    code = np.zeros((length, dim))
    code[:, 0::2] = np.sin(position * freqs)
    code[:, 1::2] = np.cos(position * freqs[: dim // 2])
    return (code * math.sqrt(2.0)).astype(np.float32)  # unit variance, like the hashed parts


class HashTextEncoder(TextEncoder):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__(cfg.dim, cfg.max_length, cfg.device, cfg.batch_size, cfg.cache_size, cfg.clean_captions)
        self.seed = cfg.seed
        self._positions = position_code(self.max_length, self.dim)

    def token_vectors(self, text: str) -> np.ndarray:
        tokens = tokenize(text)[: self.max_length - 1] + [END_TOKEN]
        rows = []
        previous = "<start>"
        for token in tokens:
            vec = hashed_vector(self.seed, self.dim, "w:" + token).copy()
            padded = f"<{token}>"
            trigrams = [padded[i:i + 3] for i in range(max(len(padded) - 2, 1))]
            vec += _TRIGRAM_WEIGHT * np.mean([hashed_vector(self.seed, self.dim, "c:" + g) for g in trigrams], axis=0)
            vec += _PAIR_WEIGHT * hashed_vector(self.seed, self.dim, f"p:{previous} {token}")
            rows.append(vec)
            previous = token
        out = np.stack(rows) + _POSITION_WEIGHT * self._positions[: len(rows)]
        return out / np.sqrt(np.mean(out ** 2, axis=1, keepdims=True))  # unit RMS per token

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            rows = torch.from_numpy(self.token_vectors(prompt))
            emb[i, : len(rows)] = rows
            mask[i, : len(rows)] = True
        return emb.to(self.device), mask.to(self.device)
