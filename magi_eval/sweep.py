"""The hydra entry point: one cell per job, a progress bar over cells, the aggregate at the end.

    python -m magi_eval checkpoint=A infer_config=F clips.path=D                        one cell
    python -m magi_eval --multirun checkpoint=A,B sampler.num_steps=8,16 ...           a sweep, cells in turn
    python -m magi_eval --multirun hydra/launcher=submitit_slurm ...                   one Slurm job per cell

Complete cells are skipped (magi_eval.cell), so rerunning an interrupted sweep runs only the missing ones. Bad
input (a checkpoint that does not exist or does not fit the model, a bad key) stops with one line."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from magi_train.errors import ConfigError

from .config import build_eval_config, register_sampler_node

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs" / "eval")
BAD_INPUT = (ConfigError, ValueError, FileNotFoundError, KeyError)


def _fail(e: Exception) -> None:
    msg = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)) or type(e).__name__
    print(f"error: {str(msg).splitlines()[0]}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _sweep_values(config: DictConfig) -> dict[str, list[str]]:
    """{key: values} of every swept key (command line and hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params") or {}
    items += [f"{k}={v}" for k, v in params.items()]
    out = {}
    for o in OverridesParser.create().parse_overrides(items):
        if o.is_sweep_override():
            out[o.get_key_element()] = list(o.sweep_string_iterator())
    return out


class SweepCallback(Callback):
    """Progress over cells (jobs of this process) and the aggregate when the sweep ends."""

    def __init__(self) -> None:
        self.bar = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        values = _sweep_values(config)
        try:   # a missing checkpoint stops the sweep before its first cell
            from .checkpoints import resolve_checkpoint

            for ckpt in values.get("checkpoint", []):
                resolve_checkpoint(ckpt)
        except BAD_INPUT as e:
            _fail(e)
        total = 1
        for v in values.values():
            total *= len(v)
        self.bar = tqdm(total=total, desc="sweep", unit="cell", position=0, file=sys.stderr,
                        disable=not config.get("progress", True))

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()
        self._aggregate(config)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        self._aggregate(config)

    @staticmethod
    def _aggregate(config: DictConfig) -> None:
        if int(os.environ.get("RANK", "0")) != 0:    # a cell sharded over torchrun ranks: rank 0 writes
            return
        from .aggregate import aggregate

        aggregate(Path(config.sweep_dir))


register_sampler_node()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(config: DictConfig) -> None:
    from .cell import run_cell

    try:
        cfg = build_eval_config(OmegaConf.to_container(config, resolve=True))
        run_cell(cfg)
    except BAD_INPUT as e:
        _fail(e)


__all__ = ["main", "SweepCallback"]
