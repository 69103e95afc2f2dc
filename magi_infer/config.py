"""Inference configs: SamplerConfig (the pipeline's knobs) and InferConfig (one run), typed and validated.

Users write MAGI-1's run-time keys flat (seed, num_steps, window_size, cfg_number, load, ...), in a MAGI-1 example
json (model_config / runtime_config / engine_config sections), in our yaml (configs/infer/*.yaml) or as
hydra-style overrides `key=value` / `model.key=value`. `load_infer_config` routes every flat key to the section
that owns it; an unknown key or a bad value is a one-line ConfigError naming it."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from magi_train.config import ConfigError, ModelConfig, check, check_choice, model_preset
from magi_train.config.parallel_config import ParallelConfig
from magi_train.config.root_config import build_dataclass
from magi_train.diffusion.sampling import TIME_SCHEDULES, parse_shortcut_mode

MODES = ("t2v", "i2v", "v2v")
CFG_NUMBERS = (1, 2, 3)
I2V_FRAME0 = ("release", "pinned")


@dataclass
class SamplerConfig:
    num_steps: int = 64                     # denoising steps every chunk goes through
    window_size: int = 4                    # chunks in flight at staggered noise levels
    shift: float = 3.0                      # SD3 resolution shift of the time grid
    time_schedule: str = "sd3"              # sd3 (t^2 then shift) | square | identity
    shortcut_mode: str = "8,16,16"          # distilled step pattern, used when num_steps equals its count (12)
    cfg_number: int = 3                     # 3: MAGI-1 base CFG; 2: text-only CFG; 1: none (distilled models)
    cfg_t_range: list[float] = field(default_factory=lambda: [0.0, 0.0217, 0.1, 0.3, 0.999])
    prev_chunk_scales: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5, 1.0, 1.0])
    text_scales: list[float] = field(default_factory=lambda: [7.5, 7.5, 7.5, 0.0, 0.0])
    noise2clean_kvrange: list[int] = field(default_factory=lambda: [5, 4, 3, 2])  # [] = full history
    clean_chunk_kvrange: int = 1            # -1: the last noise2clean_kvrange value
    clean_t: float = 0.9999                 # noise level at which finished chunks write their K/V
    distill_nearly_clean_chunk_threshold: float = 0.3  # cfg 1: extra pass for an oldest chunk with t above it
    prev_chunks_scale: float = 0.7          # weight of the with-history velocity in that extra pass
    kv_offload: bool = False                # keep cached K/V in CPU memory
    i2v_frame0: str = "release"             # release: image + v*dt of the last step, as MAGI-1 emits it; pinned: the image

    def __post_init__(self) -> None:
        for name in ("num_steps", "window_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive integer, got {v!r}")
        check(self.num_steps % self.window_size == 0, "num_steps",
              f"must be a multiple of window_size={self.window_size}, got {self.num_steps}")
        check(self.shift >= 1.0, "shift", f"must be >= 1, got {self.shift}")
        check_choice(self.time_schedule, "time_schedule", TIME_SCHEDULES)
        try:
            parse_shortcut_mode(self.shortcut_mode)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_choice(self.cfg_number, "cfg_number", CFG_NUMBERS)
        n = len(self.cfg_t_range)
        check(n > 0 and len(self.prev_chunk_scales) == n and len(self.text_scales) == n, "cfg_t_range",
              f"cfg_t_range, prev_chunk_scales and text_scales need the same length, got "
              f"{n}, {len(self.prev_chunk_scales)}, {len(self.text_scales)}")
        check(list(self.cfg_t_range) == sorted(self.cfg_t_range) and self.cfg_t_range[0] <= 0.0, "cfg_t_range",
              f"must be increasing and start at 0, got {self.cfg_t_range}")
        check(all(isinstance(r, int) and r > 0 for r in self.noise2clean_kvrange), "noise2clean_kvrange",
              f"must be positive chunk counts, got {self.noise2clean_kvrange}")
        if self.noise2clean_kvrange:
            check(self.num_steps % len(self.noise2clean_kvrange) == 0, "noise2clean_kvrange",
                  f"its length {len(self.noise2clean_kvrange)} must divide num_steps={self.num_steps}")
        check(self.clean_chunk_kvrange == -1 or self.clean_chunk_kvrange > 0, "clean_chunk_kvrange",
              f"must be a positive chunk count or -1, got {self.clean_chunk_kvrange}")
        check(0.0 < self.clean_t <= 1.0, "clean_t", f"must lie in (0, 1], got {self.clean_t}")
        check(0.0 <= self.prev_chunks_scale, "prev_chunks_scale", f"must be >= 0, got {self.prev_chunks_scale}")
        check_choice(self.i2v_frame0, "i2v_frame0", I2V_FRAME0)


@dataclass
class InferConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp=1))
    # --- the video (MAGI-1 run-time keys) ---
    seed: int = 1234
    video_size_h: int = 720
    video_size_w: int = 720
    num_frames: int = 96                    # frames to generate (I2V/V2V: after the conditioning frames)
    fps: int = 24
    prefix_frames: int = 32                 # V2V: frames of the prefix video used (MAGI-1: 32)
    # --- weights and encoders ---
    load: Optional[str] = None              # DiT checkpoint directory; None: random weights (tests, benchmarks)
    fp8_quant: bool = False                 # read {load}/inference_weight.fp8[.distill]
    t5_pretrained: Optional[str] = None     # None: the offline hash text encoder
    t5_device: str = "cpu"
    vae_pretrained: Optional[str] = None    # MAGI-1 VAE or a small-VAE directory; None: an untrained small VAE
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4
    special_tokens_path: Optional[str] = None   # .npz of MAGI-1 special tokens; absent: none are added
    special_tokens: Optional[list[str]] = None  # names to prepend; None: from PAD_* environment variables
    negative_special_tokens: Optional[list[str]] = None  # before the null caption; None: MAGI-1's if NEG_PROMPT=1
    # --- execution ---
    device: str = "auto"                    # auto: cuda when available
    dtype: str = "auto"                     # auto: model.params_dtype on GPU, float32 on CPU
    compile: Optional[bool] = None          # fuse the layers' fp32 islands with torch.compile; None: on for CUDA
    frames_dir: Optional[str] = None        # also dump every frame as PNG here
    crf: int = 18                           # x264 quality of the streamed mp4

    def __post_init__(self) -> None:
        for name in ("video_size_h", "video_size_w", "num_frames", "fps", "prefix_frames", "temporal_downsample_factor"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive integer, got {v!r}")
        check(self.scale_factor > 0, "scale_factor", f"must be > 0, got {self.scale_factor}")
        check_choice(self.dtype, "dtype", ("auto", "float32", "bfloat16"))
        if self.model.distill:
            check(self.sampler.cfg_number == 1, "cfg_number",
                  f"distilled models have guidance distilled in: set cfg_number 1, got {self.sampler.cfg_number}")

    def check_sizes(self, spatial_factor: int, temporal_factor: int) -> None:
        """Sizes the VAE and the DiT can tile: one-line errors naming the key."""
        q = spatial_factor * self.model.patch_size
        for name in ("video_size_h", "video_size_w"):
            v = getattr(self, name)
            check(v % q == 0, name, f"{v} is not divisible by {q} (VAE factor {spatial_factor} x patch "
                                    f"{self.model.patch_size})")
        frames = self.model.chunk_width * temporal_factor
        check(self.num_frames % frames == 0, "num_frames",
              f"{self.num_frames} is not a multiple of the chunk ({self.model.chunk_width} latent frames = {frames} frames)")


# ----------------------------------------------------------------------------- loading
# MAGI-1 keys with another home or no effect here.
ALIASES = {"pp_size": "parallel.pp", "cp_size": "parallel.cp", "tp_size": "parallel.tp", "distill": "model.distill",
           "chunk_width": "model.chunk_width"}
IGNORED = {"model_name", "distributed_backend", "distributed_timeout_minutes", "ulysses_overlap_degree",
           "enable_cuda_graph"}
CP_STRATEGIES = {"none": "ulysses", "cp_ulysses": "ulysses", "ulysses": "ulysses"}


def _flat_owner() -> dict[str, str]:
    owner = {f.name: f"sampler.{f.name}" for f in dataclasses.fields(SamplerConfig)}
    owner.update({f.name: f.name for f in dataclasses.fields(InferConfig)})
    owner.update(ALIASES)
    return owner


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        tree = node
    tree[parts[-1]] = value


def _route(key: str, value, tree: dict) -> None:
    """Put one user key (flat MAGI-1 name or dotted path) where it belongs in the nested tree."""
    if key.split(".")[-1] in IGNORED:
        return
    if key == "cp_strategy":
        check(value in CP_STRATEGIES, "cp_strategy",
              f"got {value!r}, accepted values are {', '.join(map(repr, CP_STRATEGIES))}")
        _set(tree, "parallel.cp_strategy", CP_STRATEGIES[value])
        return
    if key == "params_dtype" or key.endswith(".params_dtype"):
        value = str(value).replace("torch.", "")
    head = key.split(".")[0]
    owner = _flat_owner()
    if "." in key and head in ("model", "sampler", "parallel"):
        _set(tree, key, value)
    elif key in owner:
        _set(tree, owner[key], value)
    else:
        near = difflib.get_close_matches(key, list(owner), n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise ConfigError(f"{key}: unknown key{hint} (accepted: MAGI-1 run-time keys such as "
                          f"{', '.join(sorted(k for k in owner if k not in ('model', 'sampler', 'parallel'))[:12])}, ...,"
                          f" and model.*, sampler.*, parallel.*)")


def _read_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config_file: {p} does not exist")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"config_file: {p} does not hold a mapping")
    data.pop("defaults", None)  # hydra's composition list; our files are self-contained
    return data


def _flatten_magi_json(data: dict) -> dict:
    """MAGI-1 example json (three sections) -> our tree: model_config -> model, the rest flat."""
    if not any(k in data for k in ("model_config", "runtime_config", "engine_config")):
        return data
    out = {k: v for k, v in data.items() if k not in ("model_config", "runtime_config", "engine_config")}
    if "model_config" in data:
        out["model"] = dict(data["model_config"])
    for section in ("runtime_config", "engine_config"):
        out.update(data.get(section, {}))
    return out


def load_infer_config(config_file: str | None = None, overrides: list[str] | dict | None = None) -> InferConfig:
    """A file (MAGI-1 json, flat json or our yaml) plus overrides ('key=value' strings or a dict) -> InferConfig."""
    raw = _flatten_magi_json(_read_file(config_file)) if config_file else {}
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            k, v = item.split("=", 1)
            pairs.append((k.strip().lstrip("+"), _parse_value(v)))
    tree: dict = {}
    for key, value in raw.items():
        if key in ("model", "sampler", "parallel") and isinstance(value, dict):
            for sub, v in value.items():
                _route(f"{key}.{sub}", v, tree)
        else:
            _route(key, value, tree)
    for key, value in pairs:
        _route(key, value, tree)
    model = tree.pop("model", {})
    preset = model.pop("preset", None)
    if preset is not None:
        base = dataclasses.asdict(model_preset(preset))
        model = {**base, **model}
    tree["model"] = model
    tree.setdefault("parallel", {}).setdefault("dp", 1)
    return build_dataclass(InferConfig, tree)
