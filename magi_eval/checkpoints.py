"""What a sweep's `checkpoint=` names: MAGI-1 weights (a training run's export/step_N, or any directory magi_infer
loads), the training step it holds, and whether it fits the model of the inference config, each failure one
line naming the checkpoint."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from magi_train.model.checkpoint_io import resolve_weight_dir

_STEP = re.compile(r"step_(\d+)")


@dataclass
class Checkpoint:
    path: Path                    # as the user gave it, resolved
    weights: Path                 # the directory magi_infer's `load` reads
    step: Optional[int]           # training step (from step_N in the path), None when unknown
    run_model: Optional[dict]     # model section of the training run's config.yaml, when the run dir is known

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.path.name


def resolve_checkpoint(path: str) -> Checkpoint:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if (p / ".metadata").is_file():
        raise ValueError(f"checkpoint: {path} is a training checkpoint (torch.distributed.checkpoint); sweeps read "
                         f"MAGI-1 weights: the run's export/step_N (train.checkpoint.export_every_steps=N writes them)")
    try:
        weights = resolve_weight_dir(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint: {path} holds no MAGI-1 weights (model.safetensors or "
                                f"inference_weight/)") from None
    steps = [int(m.group(1)) for part in p.parts for m in [_STEP.fullmatch(part)] if m]
    return Checkpoint(p, weights, steps[-1] if steps else None, _run_model(p))


def _run_model(p: Path) -> Optional[dict]:
    """A training run writes {run}/config.yaml and exports to {run}/export/step_N."""
    if p.parent.name == "export" and (p.parent.parent / "config.yaml").is_file():
        cfg = yaml.safe_load((p.parent.parent / "config.yaml").read_text()) or {}
        return cfg.get("model") if isinstance(cfg.get("model"), dict) else None
    return None


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
              "in_channels", "out_channels", "caption_channels", "patch_size", "t_patch_size", "chunk_width")


def check_fits(ckpt: Checkpoint, model_cfg, infer_config: str) -> None:
    """One line when the training run's model differs from the infer config's in a key that shapes the weights."""
    if ckpt.run_model is None:
        return
    for k in SHAPE_KEYS:
        if k in ckpt.run_model and hasattr(model_cfg, k) and ckpt.run_model[k] != getattr(model_cfg, k):
            raise ValueError(f"checkpoint: {ckpt.path} does not fit the model of {infer_config}: it was trained "
                             f"with model.{k}={ckpt.run_model[k]}, the infer config has {getattr(model_cfg, k)}")


__all__ = ["Checkpoint", "resolve_checkpoint", "check_fits"]
