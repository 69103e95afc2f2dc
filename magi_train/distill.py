"""Distillation entry point: `python -m magi_train.distill experiment=distill key=value ...` (slurm/distill.sbatch).

The training entry point with train.objective=shortcut_distill and model.distill=true set first (the experiment
and the command line may still override them): one training path, docs/distill.md."""
from __future__ import annotations

import sys

from magi_train.train import USAGE, main as train_main

DISTILL_DEFAULTS = ["train.objective=shortcut_distill", "model.distill=true"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE.replace("magi_train.train", "magi_train.distill"))
        print("  distillation keys: distill.* (magi_train/config/distill_config.py), docs/distill.md")
        return 0
    return train_main([*DISTILL_DEFAULTS, *argv])


if __name__ == "__main__":
    sys.exit(main())
