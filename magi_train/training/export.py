"""Export the (EMA) weights in MAGI-1's safetensors format, loadable by MAGI-1's inference and by magi_infer."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from magi_train.dtypes import DTYPES

from .ema import EMA, clean_name


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def export_state_dict(model: nn.Module, ema: EMA | None) -> dict[str, torch.Tensor]:
    """Whole (unsharded) state dict with MAGI-1 names; EMA values replace the trained parameters when given."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {clean_name(k): v for k, v in state.items()}
    if ema is not None:
        for k, v in ema.shadow.items():
            state[k] = _full(v).detach().cpu().to(state[k].dtype)
    return state


def export_magi(model: nn.Module, ema: EMA | None, out_dir: str | Path, dtype: str = "bfloat16") -> Path | None:
    """Write {out_dir}/model.safetensors (rank 0); returns the directory on rank 0, None elsewhere."""
    from magi_train.model.checkpoint_io import save_magi_checkpoint

    state = export_state_dict(model, ema)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return save_magi_checkpoint(state, out_dir, dtype=DTYPES[dtype])


__all__ = ["export_magi", "export_state_dict"]
