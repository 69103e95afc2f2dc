"""Training entry point: `python -m magi_train.train experiment=NAME key=value ...` (or `magi-train ...`).

Exit codes: 0 finished or preempted (SIGTERM/SIGUSR1, also during start-up: checkpoint written), 2 bad
configuration or a checkpoint that does not fit (one line on stderr naming the key), 3-6 a run that cannot go
on (run directory in use, checkpoints not writable, diverged, no usable data; see training/run_errors.py).
Multi-process runs start with torchrun (`torchrun --nproc-per-node N -m magi_train.train ... parallel.tp=2 ...`);
magi_train.parallel sets up the groups from torchrun's environment."""
from __future__ import annotations

import logging
import os
import signal
import sys

USAGE = """usage: python -m magi_train.train [group=option ...] [key=value ...]
  groups: model=tiny|debug|4.5B|24B  train=default|...  data=synthetic|latent|raw  parallel=...  experiment=NAME
  keys:   any field of the config tree, e.g. train.optimizer.lr=3e-4 train.max_steps=1000 name=myrun resume=auto
  see configs/ and magi_train/config/ for every key and its meaning"""


def _hold_stop_signals() -> tuple[list[int], dict]:
    """Keep SIGTERM/SIGUSR1 that arrive while the trainer imports (seconds: torch) for the PreemptionFlag."""
    received: list[int] = []
    signals = (signal.SIGTERM, signal.SIGUSR1)   # preemption.STOP_SIGNALS, before that module can be imported
    return received, {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signals}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    received, before = _hold_stop_signals()
    from magi_train.training.preemption import PreemptionFlag

    flag = PreemptionFlag(received=received[-1] if received else None)   # stop signals from here on: exit 0
    # torchrun: rank 0 speaks for the job (the other ranks would repeat its lines); errors from every rank
    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.ERROR, format="%(message)s")
    from magi_train.config import ConfigError
    from magi_train.data.skip_guard import DataUnusable
    from magi_train.training.config_loading import load_config
    from magi_train.training.loop import Trainer
    from magi_train.training.run_errors import RunStopped, tell_launcher

    try:
        try:
            cfg = load_config(argv)
            trainer = Trainer(cfg, flag)
        except (ConfigError, ValueError, FileNotFoundError) as e:
            print(f"config error: {e}", file=sys.stderr)
            tell_launcher(f"config error: {e}")
            return 2
        try:
            return trainer.fit()
        finally:
            trainer.close()
    except (RunStopped, DataUnusable) as e:
        print(f"error: {e}", file=sys.stderr)
        tell_launcher(f"error: {e}")
        return e.exit_code
    finally:
        flag.restore()
        for s, handler in before.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
