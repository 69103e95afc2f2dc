"""Before a resume loads anything: does the checkpoint fit this model?

DCP loads only the keys it is asked for, so a smaller model "resumes" from a bigger one's checkpoint and
silently drops weights, and a bigger one fails deep inside DCP. This check compares the model tensors the run
would load with the shapes in the checkpoint's .metadata (which both checkpoint formats write) and stops with
one line naming the first tensor that differs, before config.yaml is written or any checkpoint pruned.
`train.resume_partial=true` loads what fits instead and says what it left out: those tensors (and their
optimizer moments and EMA copies) keep this run's initial values."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from magi_train.errors import RunStopped

log = logging.getLogger("magi_train")
MODEL = "model."


class ResumeMismatch(RunStopped):
    exit_code = 2


def saved_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every tensor in a DCP checkpoint, from its .metadata alone."""
    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}


def differences(saved: dict[str, tuple], wanted: dict[str, tuple], same_format: bool,
                whole: set[str] | None = None) -> list[tuple[str, str]]:
    """[(model key, why)] for each model tensor that does not fit, this model's order first. A checkpoint of the
    other format stores the same tensor in another (whole vs canonical) shape: there only the size counts.
    whole: every model key of the whole model, when `wanted` holds only this rank's part (a pipeline stage)."""
    out = []
    for key, shape in wanted.items():
        if key not in saved:
            out.append((key, f"this model has {key} {list(shape)}, the checkpoint does not"))
        elif saved[key] != shape and (same_format or _numel(saved[key]) != _numel(shape)):
            out.append((key, f"{key} is {list(saved[key])} in the checkpoint, {list(shape)} in this model"))
    for key, shape in saved.items():
        if key.startswith(MODEL) and key not in (wanted if whole is None else whole):
            out.append((key, f"the checkpoint has {key} {list(shape)}, this model does not"))
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class Fitted:
    """What fit_to_checkpoint left out of the state (to put back after the load) and whether it left any."""

    def __init__(self, removed: list[tuple[tuple, object]]):
        self.removed = removed

    @property
    def partial(self) -> bool:
        return bool(self.removed)

    def restore(self, state: dict) -> None:
        """Put the left-out entries back (the one-process format hands the whole state to set_state_dict)."""
        for path, value in self.removed:
            parent = state
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = value


def _mentions(key: str, names: set[str]) -> bool:
    dotted = f".{key}."
    return any(f".{n}." in dotted for n in names)


def config_differences(path: Path, model_cfg) -> str:
    """' (model.num_layers: 2 in the run's config.yaml, 1 now)' for the run that wrote the checkpoint at `path`
    ({run}/checkpoints/step_*), or '' when its config.yaml is not there or says the same."""
    run_config = path.parent.parent / "config.yaml"
    if model_cfg is None or not run_config.is_file():
        return ""
    model_cfg = dataclasses.asdict(model_cfg)
    try:
        import yaml

        saved = (yaml.safe_load(run_config.read_text()) or {}).get("model") or {}
    except Exception:   # noqa: BLE001 - an unreadable config.yaml only costs the hint
        return ""
    diffs = [f"model.{k}: {saved[k]} in the run's config.yaml, {v} now" for k, v in model_cfg.items()
             if k in saved and saved[k] != v]
    return f" ({'; '.join(diffs[:3])})" if diffs else ""


def whole_model_keys(model_cfg) -> set[str]:
    """'model.NAME' of every parameter of the whole model (built on the meta device: no memory)."""
    from magi_train.model import build_dit

    return {MODEL + n for n, _ in build_dit(model_cfg, device="meta").named_parameters()}


def fit_to_checkpoint(path: str | os.PathLike, state: dict, allow_partial: bool, model_cfg=None,
                      same_format: bool = True, stage_only: bool = False) -> Fitted:
    """Check `state` (what the run would load) against the checkpoint at `path`. Raises ResumeMismatch with one
    line when a model tensor differs (naming the model.* settings that differ from the run's config.yaml when
    model_cfg, this run's ModelConfig, is given); with allow_partial removes the entries of every such tensor
    instead (weights, optimizer moments, EMA) and logs what was left out. stage_only: the state holds one
    pipeline stage's part of the model (the checkpoint's other tensors belong to the other stages)."""
    path = Path(path)
    flat, mapping = flatten_state_dict(state)
    wanted = {k: tuple(v.shape) for k, v in flat.items() if k.startswith(MODEL) and torch.is_tensor(v)}
    whole = whole_model_keys(model_cfg) if stage_only else None
    diffs = differences(saved_shapes(path), wanted, same_format, whole)
    if not diffs:
        return Fitted([])
    if not allow_partial:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ResumeMismatch(f"resume: {path.name} does not fit this model: {diffs[0][1]}{more}"
                             f"{config_differences(path, model_cfg)}; resume with the "
                             f"model it was trained with, set train.resume_partial=true to load only the tensors "
                             f"that fit, or choose another name=")
    names = {k[len(MODEL):] for k, _ in diffs if k in wanted}
    removed = []
    for key, value in flat.items():
        group_params = key.startswith("optimizer.param_groups.") and key.endswith(".params")
        if group_params or (torch.is_tensor(value) and _mentions(key, names)):
            obj_path = mapping[key]
            parent = state
            for k in obj_path[:-1]:
                parent = parent[k]
            removed.append((obj_path, parent.pop(obj_path[-1])))
    skipped = [k for k, _ in diffs if k not in wanted]
    log.warning("resume: train.resume_partial: %d tensor(s) of %s do not fit and keep this run's initial values "
                "(%s), %d checkpoint tensor(s) are left unused (%s)", len(names), path.name,
                _few(sorted(names)), len(skipped), _few(skipped))
    return Fitted(removed)


def _few(items: list[str], n: int = 3) -> str:
    if not items:
        return "none"
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")


__all__ = ["ResumeMismatch", "fit_to_checkpoint", "saved_shapes", "differences", "Fitted"]
