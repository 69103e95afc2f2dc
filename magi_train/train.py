"""Training entry point: `python -m magi_train.train experiment=NAME key=value ...` (or `magi-train ...`).

Exit codes: 0 finished or preempted (SIGTERM/SIGUSR1: checkpoint written), 2 bad configuration (one line on
stderr naming the key). Multi-process runs start with torchrun (`torchrun --nproc-per-node N -m magi_train.train
... parallel.tp=2 ...`); magi_train.parallel sets up the groups from torchrun's environment."""
from __future__ import annotations

import logging
import os
import sys

USAGE = """usage: python -m magi_train.train [group=option ...] [key=value ...]
  groups: model=tiny|debug|4.5B|24B  train=default|...  data=synthetic|latent|raw  parallel=...  experiment=NAME
  keys:   any field of the config tree, e.g. train.optimizer.lr=3e-4 train.max_steps=1000 name=myrun resume=auto
  see configs/ and magi_train/config/ for every key and its meaning"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    # torchrun: rank 0 speaks for the job (the other ranks would repeat its lines); errors from every rank
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.ERROR, format="%(message)s")
    from magi_train.config import ConfigError
    from magi_train.training.config_loading import load_config
    from magi_train.training.loop import Trainer

    try:
        cfg = load_config(argv)
        trainer = Trainer(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        return trainer.fit()
    finally:
        trainer.close()


if __name__ == "__main__":
    sys.exit(main())
