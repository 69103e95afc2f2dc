"""EvalConfig: one cell of an evaluation sweep (a checkpoint x sampler settings on a set of held-out clips).

Hydra fills it from configs/eval/config.yaml and the command line; the strict builder of magi_train types and
checks it, so a bad value is one line naming the key. Every magi_infer sampler key is a `sampler.*` key here
(null: the infer config's value), registered from SamplerConfig so that the two never drift apart."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from magi_infer.config import SamplerConfig
from magi_train.config.root_config import build_dataclass
from magi_train.errors import ConfigError, check, check_choice

CLIP_KINDS = ("synthetic", "physics_iq")


@dataclass
class ClipsConfig:
    kind: str = "synthetic"       # synthetic: a folder of synthetic-world clips (mp4 + trajectory json + caption txt);
                                  # physics_iq: a local copy of the Physics-IQ benchmark (or magi_eval.physics_iq_standin)
    path: str = "???"
    max_clips: int = 16           # the first clips in name order
    prefix_frames: int = 12       # frames the model is conditioned on (V2V)
    num_frames: int = 12          # frames predicted after them and scored

    def __post_init__(self) -> None:
        check_choice(self.kind, "clips.kind", CLIP_KINDS)
        for name in ("max_clips", "prefix_frames", "num_frames"):
            v = getattr(self, name)
            check(isinstance(v, int) and v > 0, f"clips.{name}", f"must be a positive integer, got {v!r}")


@dataclass
class FVDConfig:
    i3d_path: Optional[str] = None    # a local i3d_torchscript.pt; null: FVD is skipped (nothing is downloaded)


@dataclass
class EvalConfig:
    checkpoint: str = "???"       # MAGI-1 weights directory (a training run's export/step_N), or any magi_infer `load`
    infer_config: str = "???"     # inference config the checkpoint runs with (MAGI-1 json or configs/infer/*.yaml)
    sampler: dict[str, Any] = field(default_factory=dict)   # sampler.* of magi_infer; null = the infer config's
    infer_overrides: list[str] = field(default_factory=list)  # other magi_infer run-time keys, key=value
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    fvd: FVDConfig = field(default_factory=FVDConfig)
    sweep_dir: str = "runs/eval"  # cells/<cell>/ per cell, results.csv / results.md / plots / grid.mp4 beside
    videos: int = 1               # clips of which a cell keeps its continuation as mp4 (the grid video uses the first)
    shard: str = "0/1"            # i/N: run only the cells whose name hashes to i of N (one sweep process per GPU)
    progress: bool = True

    def __post_init__(self) -> None:
        check(isinstance(self.videos, int) and self.videos >= 1, "videos", f"must be an integer >= 1, got {self.videos!r}")
        parts = str(self.shard).split("/")
        ok = len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1])
        check(ok, "shard", f"must be i/N with 0 <= i < N, e.g. 0/4, got {self.shard!r}")
        known = set(sampler_keys())
        for k in self.sampler:
            check(k in known, f"sampler.{k}", f"unknown key; accepted: {', '.join(sorted(known))}")

    def in_shard(self, cell_name: str) -> bool:
        import zlib

        i, n = map(int, str(self.shard).split("/"))
        return zlib.crc32(cell_name.encode()) % n == i

    def sampler_overrides(self) -> dict[str, Any]:
        return {k: v for k, v in sorted(self.sampler.items()) if v is not None}


def sampler_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(SamplerConfig)]


def register_sampler_node() -> None:
    """configs/eval/config.yaml takes `sampler` from this node: every key of SamplerConfig, null."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="magi_eval_sampler", node={k: None for k in sampler_keys()})


def build_eval_config(values: dict) -> EvalConfig:
    values = {k: v for k, v in values.items() if k != "hydra"}
    return build_dataclass(EvalConfig, values)


__all__ = ["EvalConfig", "ClipsConfig", "FVDConfig", "build_eval_config", "register_sampler_node", "sampler_keys",
           "ConfigError"]
