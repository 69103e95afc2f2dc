"""MAGI-1 checkpoints <-> our modules: names, the TP-8 linear_proj layout, sharded safetensors, fp8 format.

Directory conventions of the release: {load}/inference_weight[.fp8][.distill]/ holding model.safetensors or
model.safetensors.index.json + shards. Our parameter names equal MAGI-1's; only linear_proj's input columns
are stored interleaved per TP-8 shard ("(n hn hd) -> (hn n hd)", n=2 self/cross, hn=8)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from magi_train.staging import staged_directory

MAGI_PROJ_GROUPS = 8  # the release's linear_proj was laid out for 8 tensor-parallel shards
_PROJ = re.compile(r"videodit_blocks\.layers\.\d+\.self_attention\.linear_proj\.weight$")


class CheckpointMismatch(ValueError):
    """A checkpoint tensor is missing, unexpected or misshapen (the message names the key and both shapes)."""


def _proj_to_magi(w: torch.Tensor) -> torch.Tensor:
    return rearrange(w, "o (n hn hd) -> o (hn n hd)", n=2, hn=MAGI_PROJ_GROUPS)


def _proj_from_magi(w: torch.Tensor) -> torch.Tensor:
    return rearrange(w, "o (hn n hd) -> o (n hn hd)", n=2, hn=MAGI_PROJ_GROUPS)


def to_magi_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (tp=1) state dict -> MAGI-1 tensor layout (same names)."""
    out = {}
    for k, v in state.items():
        if _PROJ.search(k) and v.dtype != torch.float8_e4m3fn:
            v = _proj_to_magi(v)
        elif _PROJ.search(k):  # fp8 weight [1, out, in]
            v = _proj_to_magi(v[0].view(torch.uint8)).view(torch.float8_e4m3fn)[None]
        elif k.endswith("linear_proj.smooth_scale"):
            v = _proj_to_magi(v)
        out[k] = v.contiguous()
    return out


def from_magi_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if _PROJ.search(k) and v.dtype != torch.float8_e4m3fn:
            v = _proj_from_magi(v)
        elif _PROJ.search(k):
            v = _proj_from_magi(v[0].view(torch.uint8)).view(torch.float8_e4m3fn)[None]
        elif k.endswith("linear_proj.smooth_scale"):
            v = _proj_from_magi(v)
        out[k] = v.contiguous()
    return out


# ----------------------------------------------------------------------------- files
def resolve_weight_dir(path: str | os.PathLike, fp8: bool | None = None, distill: bool | None = None) -> Path:
    """{load} or {load}/inference_weight[.fp8][.distill] or a file -> the directory (or file) holding weights."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load: checkpoint path {p} does not exist")
    if p.is_file() or (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists():
        return p
    names = ["inference_weight" + (".fp8" if fp8 else "") + (".distill" if distill else "")]
    if fp8 is None or distill is None:
        names += sorted(d.name for d in p.iterdir() if d.is_dir() and d.name.startswith("inference_weight"))
    for name in names:
        if (p / name).is_dir():
            return p / name
    raise FileNotFoundError(f"load: {p} holds no model.safetensors, model.safetensors.index.json or "
                            f"inference_weight*/ directory")


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a single file, a directory with model.safetensors, or a sharded index."""
    p = Path(path)
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            state = {}
            for f in files:
                if not (p / f).exists():
                    raise FileNotFoundError(f"load: shard {p / f} named in {index.name} is missing")
                state.update(read_safetensors(p / f, device))
            missing = set(weight_map) - set(state)
            if missing:
                raise CheckpointMismatch(f"load: {sorted(missing)[0]}: listed in {index.name} but absent from its shard")
            return state
        p = p / "model.safetensors"
    with safe_open(str(p), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_safetensors(state: dict[str, torch.Tensor], out_dir: str | os.PathLike,
                      max_shard_bytes: int | None = None, metadata: dict | None = None) -> Path:
    """Write model.safetensors (or shards + index) into out_dir, whole or not at all (magi_train.staging)."""
    with staged_directory(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        meta = {"format": "pt", **(metadata or {})}
        if max_shard_bytes is None:
            save_file(state, str(tmp / "model.safetensors"), metadata=meta)
        else:
            shards, cur, size = [], {}, 0
            for k, v in state.items():
                nbytes = v.numel() * v.element_size()
                if cur and size + nbytes > max_shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k], size = v, size + nbytes
            shards.append(cur)
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return Path(out_dir)


# ----------------------------------------------------------------------------- model <-> checkpoint
def _check_strict(model_state: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor]) -> None:
    for k in model_state:
        if k not in ckpt:
            raise CheckpointMismatch(f"checkpoint: missing tensor {k} (model expects shape {tuple(model_state[k].shape)})")
    for k in ckpt:
        if k not in model_state:
            raise CheckpointMismatch(f"checkpoint: unexpected tensor {k} (shape {tuple(ckpt[k].shape)}) not in the model")
    for k, v in ckpt.items():
        if tuple(v.shape) != tuple(model_state[k].shape):
            raise CheckpointMismatch(f"checkpoint: {k} has shape {tuple(v.shape)}, model expects "
                                     f"{tuple(model_state[k].shape)}")


def is_fp8_state(state: dict[str, torch.Tensor]) -> bool:
    return any(v.dtype == torch.float8_e4m3fn for v in state.values())


def load_magi_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strictly load a MAGI-1-layout state dict (fp8 tensors swap in fp8 linears first). Works on meta models."""
    from magi_train.precision.magi_fp8 import swap_in_fp8_linears

    if is_fp8_state(state):
        has_fp8 = any(k.endswith("weight_scale") for k in model.state_dict())
        if not has_fp8:
            swap_in_fp8_linears(model)
    ours = from_magi_layout(state)
    model_state = model.state_dict()
    _check_strict(model_state, ours)
    converted = {}
    for k, v in ours.items():
        target = model_state[k]
        converted[k] = v if v.dtype == torch.float8_e4m3fn or target.dtype == torch.float8_e4m3fn else v.to(target.dtype)
    meta = any(t.is_meta for t in model_state.values())
    model.load_state_dict(converted, strict=True, assign=meta)


def load_magi_checkpoint(model: nn.Module, path: str | os.PathLike, fp8: bool | None = None,
                         distill: bool | None = None, device: str = "cpu") -> Path:
    """Load {load}[/inference_weight*] into the model strictly; returns the directory read."""
    where = resolve_weight_dir(path, fp8, distill)
    load_magi_state_dict(model, read_safetensors(where, device))
    return where


def magi_state_dict(model_or_state: nn.Module | dict) -> dict[str, torch.Tensor]:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return to_magi_layout({k: v for k, v in state.items()})


def save_magi_checkpoint(model_or_state: nn.Module | dict, out_dir: str | os.PathLike,
                         max_shard_bytes: int | None = None, dtype: torch.dtype | None = None) -> Path:
    """Export in the MAGI-1 format (model.safetensors or shards + index), atomically.

    dtype (e.g. bfloat16) converts floating tensors except fp8 ones; None keeps them as they are."""
    state = magi_state_dict(model_or_state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and v.dtype != torch.float8_e4m3fn else v
                 for k, v in state.items()}
    return write_safetensors(state, out_dir, max_shard_bytes)


def quantize_to_magi_fp8(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-precision model -> MAGI-1 fp8 state dict (MAGI-1 layout), weights-only scales (no calibration data)."""
    from magi_train.precision.magi_fp8 import fp8_layer_kind, fp8_layers, quantize_weight

    state = dict(model.state_dict())
    layers = model.videodit_blocks.layers
    for i in fp8_layers(len(layers)):
        for name, module in layers[i].named_modules():
            kind = fp8_layer_kind(name)
            if kind is None or not isinstance(module, nn.Linear):
                continue
            prefix = f"videodit_blocks.layers.{i}.{name}."
            del state[prefix + "weight"]
            state.update({prefix + k: v for k, v in quantize_weight(module.weight.detach(), kind).items()})
    return to_magi_layout(state)
