"""What a sweep's `checkpoint=` names: MAGI-1 weights (a training run's export/step_N, or any directory magi_infer
loads) or a training checkpoint (a run's checkpoints/step_N, either format: its EMA weights, the trained ones
without EMA), the training step it holds, and whether it fits the model of the inference config, each failure one
line naming the checkpoint."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from magi_train.checkpoint.magi_format import resolve_weight_dir

_STEP = re.compile(r"step_(\d+)")


@dataclass
class Checkpoint:
    path: Path                    # as the user gave it, resolved
    kind: str                     # "magi": weights magi_infer's `load` reads; "training": a DCP training checkpoint
    step: Optional[int]           # training step (from step_N in the path), None when unknown
    run_model: Optional[dict]     # model section of the training run's config.yaml, when the run dir is known

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.path.name


def resolve_checkpoint(path: str) -> Checkpoint:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    kind = "training" if (p / ".metadata").is_file() else "magi"
    if kind == "magi":
        try:
            resolve_weight_dir(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint: {path} holds no MAGI-1 weights (model.safetensors or "
                                    f"inference_weight/) and is no training checkpoint (.metadata)") from None
    steps = [int(m.group(1)) for part in p.parts for m in [_STEP.fullmatch(part)] if m]
    return Checkpoint(p, kind, steps[-1] if steps else None, _run_model(p))


def _run_model(p: Path) -> Optional[dict]:
    """A training run writes {run}/config.yaml, {run}/checkpoints/step_N and {run}/export/step_N."""
    if p.parent.name in ("export", "checkpoints") and (p.parent.parent / "config.yaml").is_file():
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


def training_weights(model_cfg, ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The whole tensors of a training checkpoint, in our (tp=1) layout: each tensor's EMA value where the run
    kept one, else the trained one (both checkpoint formats store canonical whole tensors under these names).
    Returns ({name: tensor}, "ema" or "trained"), to hand to parallelize as full_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    from magi_train.model import build_dit

    meta = FileSystemReader(str(ckpt.path)).read_metadata().state_dict_metadata
    own = build_dit(model_cfg, device="meta").state_dict()   # names and shapes only
    saved = {k[len("model."):] for k in meta if k.startswith("model.")}
    extra = sorted(saved - set(own) - {k for k in saved if not hasattr(meta[f"model.{k}"], "size")})
    if extra:
        raise ValueError(f"checkpoint: {ckpt.path} does not fit the model (it holds {extra[0]}, the model has no "
                         f"such tensor)")
    wanted, used_ema = {}, False
    for name, t in own.items():
        key = f"ema.shadow.{name}" if f"ema.shadow.{name}" in meta else f"model.{name}"
        if key not in meta:
            raise ValueError(f"checkpoint: {ckpt.path} does not fit the model (no tensor {name})")
        if meta[key].size.numel() != t.numel():
            raise ValueError(f"checkpoint: {ckpt.path} does not fit the model ({name} has shape "
                             f"{tuple(meta[key].size)}, the model expects {tuple(t.shape)})")
        used_ema |= key.startswith("ema.")
        wanted[key] = torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
    dcp.load(wanted, checkpoint_id=str(ckpt.path), planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    state = {}
    for name, t in own.items():
        key = f"ema.shadow.{name}" if f"ema.shadow.{name}" in wanted else f"model.{name}"
        state[name] = wanted[key].reshape(t.shape)
    return state, "ema" if used_ema else "trained"


__all__ = ["Checkpoint", "resolve_checkpoint", "check_fits", "training_weights"]
