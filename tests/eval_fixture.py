"""A tiny evaluation setup for the sweep tests: two exported checkpoints of the embedded default's model (a
training run's layout: {run}/config.yaml, {run}/export/step_N), an inference config and synthetic-world clips."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import yaml

from data_tools.synthetic_world import WorldConfig, write_dataset
from magi_train.model import build_dit
from magi_train.checkpoint.magi_format import save_magi_checkpoint
from magi_train.training.config_loading import load_config

WORLD = WorldConfig(height=32, width=32, fps=8, num_frames=24, min_objects=1, max_objects=2)
STEPS = (10, 20)


def make_eval_fixture(root: Path, num_clips: int = 2) -> dict:
    model_cfg = load_config(["experiment=quickstart", f"data.shards={root}"]).model
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}))
    ckpts = []
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        ckpts.append(save_magi_checkpoint(build_dit(model_cfg), run / "export" / f"step_{step:08d}"))
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "in_channels", "out_channels", "caption_channels", "caption_max_length", "chunk_width", "patch_size", "t_patch_size",
            "attention_backend")
    infer = {"model_config": {k: getattr(model_cfg, k) for k in keys},
             "runtime_config": {"seed": 1234, "video_size_h": 32, "video_size_w": 32, "fps": 8, "window_size": 2,
                                "num_steps": 2, "cfg_number": 1, "noise2clean_kvrange": [],
                                "clean_chunk_kvrange": -1, "temporal_downsample_factor": 1, "device": "cpu"}}
    infer_path = root / "infer.json"
    infer_path.write_text(json.dumps(infer))
    clips = root / "clips"
    write_dataset(clips, num_clips, WORLD, seed=5, split_name="val", progress=False)
    return {"checkpoints": [str(c) for c in ckpts], "infer_config": str(infer_path), "clips": str(clips),
            "model": model_cfg}
