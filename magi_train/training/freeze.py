"""Fine-tune only part of the model: parameters chosen by fnmatch patterns on their (clean) names."""
from __future__ import annotations

from fnmatch import fnmatchcase


def is_trainable(name: str, trainable: list[str], frozen: list[str]) -> bool:
    """Matches a `trainable` pattern (or there are none) and no `frozen` pattern."""
    train = not trainable or any(fnmatchcase(name, pat) for pat in trainable)
    return train and not any(fnmatchcase(name, pat) for pat in frozen)


def check_patterns(names: list[str], trainable: list[str], frozen: list[str]) -> None:
    """A pattern that matches none of `names` (the whole model's) is an error (likely a typo)."""
    for key, patterns in (("train.trainable", trainable), ("train.frozen", frozen)):
        for pat in patterns:
            if not any(fnmatchcase(n, pat) for n in names):
                raise ValueError(f"{key}: pattern {pat!r} matches no parameter (names look like "
                                 f"'videodit_blocks.layers.0.mlp.linear_fc1.weight')")


def freezing_counts(sizes: dict[str, int], trainable: list[str], frozen: list[str]) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model given {name: numel}; checks the patterns first."""
    check_patterns(list(sizes), trainable, frozen)
    counts = [n for name, n in sizes.items() if is_trainable(name, trainable, frozen)]
    if not counts:
        raise ValueError("train.trainable: the patterns leave no parameter to train")
    return sum(counts), sum(sizes.values())


__all__ = ["is_trainable", "check_patterns", "freezing_counts"]
