"""MAGI-1 checkpoints straight into any layout: tensors are read one at a time and cut to this rank's shard.

`magi_tensor_getter(path)` maps a parameter name to its full tensor in our (tp=1) layout, reading lazily from
model.safetensors or a sharded index, so a 24B checkpoint never sits whole in one process. Pass it as
`parallelize(..., full_state=getter)`. Without a checkpoint, `one_process_state` gives the weights one process
draws."""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
from safetensors import safe_open

from magi_train.config import ConfigError
from magi_train.checkpoint.magi_format import CheckpointMismatch, from_magi_layout, resolve_weight_dir



def magi_tensor_getter(path: str | os.PathLike, fp8: bool | None = None, distill: bool | None = None,
                       device: str = "cpu") -> Callable[[str], torch.Tensor]:
    where = resolve_weight_dir(path, fp8, distill)
    if where.is_file():
        files = {None: where}
        owner = None
    elif (where / "model.safetensors.index.json").exists():
        weight_map = json.loads((where / "model.safetensors.index.json").read_text())["weight_map"]
        owner = weight_map
        files = {f: where / f for f in set(weight_map.values())}
    else:
        files = {None: where / "model.safetensors"}
        owner = None
    handles = {k: safe_open(str(f), framework="pt", device=device) for k, f in files.items()}

    def get(name: str) -> torch.Tensor:
        if owner is not None and name not in owner:
            raise CheckpointMismatch(f"checkpoint: missing tensor {name}")
        handle = handles[owner[name]] if owner is not None else handles[None]
        try:
            t = handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointMismatch(f"checkpoint: missing tensor {name} ({e})") from None
        if t.dtype == torch.float8_e4m3fn:
            raise ConfigError("fp8_quant: MAGI-1 fp8 checkpoints load into one process or cp layouts; "
                              "tensor-parallel shards need the bf16 weights")
        return from_magi_layout({name: t})[name]

    return get


def one_process_state(model_cfg, seed: int, device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights one process draws with `seed` (our tp=1 layout): what every layout starts from when no
    checkpoint is given and the model is small enough to build whole, so a layout runs the very model one
    process runs."""
    from magi_train.model import build_dit

    torch.manual_seed(seed)
    return build_dit(model_cfg, device=device, dtype=dtype).state_dict()
