"""Fine-tune only part of the model: parameters chosen by fnmatch patterns on their (clean) names."""
from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from .ema import clean_name


def apply_freezing(model: nn.Module, trainable: list[str], frozen: list[str]) -> tuple[int, int]:
    """requires_grad = (name matches a `trainable` pattern, or there are none) and matches no `frozen` pattern.
    Returns (trainable, total) parameter counts. A pattern that matches nothing is an error (likely a typo)."""
    names = {clean_name(n): p for n, p in model.named_parameters()}
    for key, patterns in (("train.trainable", trainable), ("train.frozen", frozen)):
        for pat in patterns:
            if not any(fnmatchcase(n, pat) for n in names):
                raise ValueError(f"{key}: pattern {pat!r} matches no parameter (names look like "
                                 f"'videodit_blocks.layers.0.mlp.linear_fc1.weight')")
    for n, p in names.items():
        train = not trainable or any(fnmatchcase(n, pat) for pat in trainable)
        p.requires_grad_(train and not any(fnmatchcase(n, pat) for pat in frozen))
    counts = [p.numel() for p in names.values() if p.requires_grad]
    total = sum(p.numel() for p in names.values())
    if not counts:
        raise ValueError("train.trainable: the patterns leave no parameter to train")
    return sum(counts), total


__all__ = ["apply_freezing"]
