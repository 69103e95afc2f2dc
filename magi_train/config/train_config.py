"""TrainConfig: optimisation, schedule, EMA, checkpoints, logging and the flow-matching objective (train.* keys).

Every field is checked at construction; a bad value raises ConfigError naming the full key (train.x.y)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from magi_train.errors import ConfigError, check, check_choice

T_DISTRIBUTIONS = ("uniform", "logit_normal", "inference")
CHUNK_SCHEDULES = ("sorted", "shared", "staggered")
LR_DECAYS = ("cosine", "linear", "constant")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
RECOMPUTE_MODES = ("none", "full", "selective")
RECOMPUTE_KEEP = ("qkv", "proj", "fc1", "fc2")   # the block linears whose GEMM output selective recompute can keep
# what selective keeps by default: the most FLOPs per byte that fit the 4.5B at 37,440 tokens on one 141 GB GPU
# (118 GiB measured; fc1 in every block too would need about 147: recompute_keep_extra keeps it in some blocks;
# docs/benchmarks.md)
DEFAULT_RECOMPUTE_KEEP = ("qkv", "proj", "fc2")
FP8_MODES = ("none", "torchao", "te")
# train.fp8_recipe by train.fp8; "auto" takes the first: torchao tensorwise, TE delayed scaling
FP8_RECIPES = {"none": ("auto",), "torchao": ("auto", "tensorwise", "rowwise"),
               "te": ("auto", "delayed", "current", "block")}


def _int(value, key: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")


def _unit(value, key: str, low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    check(ok, key, f"must be a number in {lo}0, 1{hi}, got {value!r}")


@dataclass
class FlowMatchingConfig:
    """How training draws noise levels. t in [0,1], 1 = clean; x_t = t*x1 + (1-t)*noise; target v = x1 - noise."""

    t_distribution: str = "logit_normal"  # uniform | logit_normal | inference (the sampler's grid: p^power, shifted)
    logit_mean: float = 0.0               # logit_normal: t = sigmoid(mean + std * z)
    logit_std: float = 1.0
    inference_power: float = 2.0          # inference: t = shift(p ** power), p uniform (MAGI-1 sampler: t^2)
    shift: float = 1.0                    # t -> t / (shift - (shift-1) t) after the draw; > 1 = noisier (MAGI-1: 3)
    chunk_schedule: str = "sorted"        # sorted: iid draws sorted so later chunks are noisier; shared: one t
                                          # per sample; staggered: chunk k lags k/stagger_window behind chunk 0
                                          # along the distribution's quantiles (the inference window's offsets)
    stagger_window: int = 4               # staggered: chunks in flight at inference (MAGI-1 window_size)
    clean_prefix_prob: float = 0.0        # probability that a sample starts with clean chunks (I2V/V2V context)
    max_clean_prefix_chunks: int = 1      # clean prefix length drawn uniformly in [1, min(this, chunks - 1)]
    clean_t: float = 0.9999               # t given to clean chunks (MAGI-1 writes the KV cache at clean_t=0.9999)
    null_caption_on_clean: bool = True    # clean context chunks see the null caption and the 'dropped' flag, the way
                                          # MAGI-1's inference encodes finished and prefix chunks into its KV cache
    caption_dropout: float = 0.1          # probability a sample sees the learned null caption (for CFG)
    t_bins: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])  # inner edges of per-t-bin loss

    def __post_init__(self) -> None:
        p = "train.flow"
        check_choice(self.t_distribution, f"{p}.t_distribution", T_DISTRIBUTIONS)
        check_choice(self.chunk_schedule, f"{p}.chunk_schedule", CHUNK_SCHEDULES)
        check(self.logit_std > 0, f"{p}.logit_std", f"must be > 0, got {self.logit_std}")
        check(self.inference_power > 0, f"{p}.inference_power", f"must be > 0, got {self.inference_power}")
        check(self.shift >= 1, f"{p}.shift", f"must be >= 1, got {self.shift}")
        _int(self.stagger_window, f"{p}.stagger_window")
        _unit(self.clean_prefix_prob, f"{p}.clean_prefix_prob")
        _int(self.max_clean_prefix_chunks, f"{p}.max_clean_prefix_chunks")
        _unit(self.clean_t, f"{p}.clean_t", low_open=True)
        _unit(self.caption_dropout, f"{p}.caption_dropout")
        self.t_bins = [float(b) for b in self.t_bins]
        check(all(0 < b < 1 for b in self.t_bins) and self.t_bins == sorted(set(self.t_bins)), f"{p}.t_bins",
              f"must be increasing values inside (0, 1), got {self.t_bins}")


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01            # not applied to norms, biases, embeddings of shape [n] and the null caption
    implementation: str = "auto"          # auto: fused on GPU, foreach on CPU

    def __post_init__(self) -> None:
        p = "train.optimizer"
        check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{p}.betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        self.betas = [float(b) for b in self.betas]
        check(self.eps > 0, f"{p}.eps", f"must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, f"{p}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        check_choice(self.implementation, f"{p}.implementation", OPTIMIZER_IMPLS)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0                 # linear warmup from 0 to optimizer.lr
    decay: str = "cosine"                 # cosine | linear | constant, after warmup
    decay_steps: Optional[int] = None     # steps of the decay after warmup; None = until train.max_steps
    min_lr_ratio: float = 0.1             # lr at the end of the decay, as a fraction of optimizer.lr

    def __post_init__(self) -> None:
        p = "train.schedule"
        _int(self.warmup_steps, f"{p}.warmup_steps", 0)
        check_choice(self.decay, f"{p}.decay", LR_DECAYS)
        if self.decay_steps is not None:
            _int(self.decay_steps, f"{p}.decay_steps")
        _unit(self.min_lr_ratio, f"{p}.min_lr_ratio")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True                   # decay = min(decay, (1 + n) / (10 + n)) over the first updates
    update_every: int = 1                 # optimizer steps between EMA updates

    def __post_init__(self) -> None:
        _unit(self.decay, "train.ema.decay", high_open=True)
        _int(self.update_every, "train.ema.update_every")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000               # 0 = only at the end and on preemption
    keep_last: int = 3                    # complete checkpoints kept; older ones are deleted
    save_at_end: bool = True
    export_every_steps: int = 0           # MAGI-1 safetensors export of the (EMA) weights; 0 = only at the end
    export_at_end: bool = False
    export_ema: bool = True               # export the EMA weights (the raw weights when EMA is off)
    export_dtype: str = "bfloat16"        # float32 | bfloat16

    def __post_init__(self) -> None:
        p = "train.checkpoint"
        _int(self.every_steps, f"{p}.every_steps", 0)
        _int(self.keep_last, f"{p}.keep_last")
        _int(self.export_every_steps, f"{p}.export_every_steps", 0)
        check_choice(self.export_dtype, f"{p}.export_dtype", ("float32", "bfloat16"))


@dataclass
class WandbConfig:
    mode: str = "offline"                 # offline | online | disabled; the WANDB_MODE variable wins when set
    project: str = "magi"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice(self.mode, "train.wandb.mode", WANDB_MODES)


@dataclass
class ValidationConfig:
    every_steps: int = 0                  # 0 = off
    batches: int = 2                      # held-out batches per validation
    t_values: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # every chunk at this t
    seed: int = 0                         # noise of validation is the same at every evaluation

    def __post_init__(self) -> None:
        p = "train.validation"
        _int(self.every_steps, f"{p}.every_steps", 0)
        _int(self.batches, f"{p}.batches")
        self.t_values = [float(t) for t in self.t_values]
        check(bool(self.t_values) and all(0 <= t < 1 for t in self.t_values), f"{p}.t_values",
              f"must be a non-empty list of numbers in [0, 1), got {self.t_values}")


@dataclass
class EvaluationConfig:
    """Generation inside training (magi_train/training/periodic_eval.py): continuations of held-out clips with the
    EMA weights, scored against the truth; sweeps over exported checkpoints are python -m magi_eval."""

    every_steps: int = 0                  # 0 = off; one-process training only
    clips: int = 2                        # held-out samples continued (the first ones, the same at every evaluation)
    prefix_chunks: int = 1                # clean chunks given; the following ones are generated one after another
    num_steps: int = 8                    # Euler steps per generated chunk (the sampler's time grid)
    shift: float = 3.0                    # the grid's shift (MAGI-1: 3)
    seed: int = 0                         # noise of the generated chunks, the same at every evaluation
    video: bool = True                    # keep the first clip (truth | generated) as mp4; needs encoders.vae.path
    fps: int = 8                          # frame rate of that mp4 (latent shards do not record one)

    def __post_init__(self) -> None:
        p = "train.evaluation"
        _int(self.every_steps, f"{p}.every_steps", 0)
        _int(self.clips, f"{p}.clips")
        _int(self.prefix_chunks, f"{p}.prefix_chunks")
        _int(self.num_steps, f"{p}.num_steps")
        check(self.shift >= 1, f"{p}.shift", f"must be >= 1, got {self.shift}")
        _int(self.seed, f"{p}.seed", 0)
        _int(self.fps, f"{p}.fps")


@dataclass
class TrainConfig:
    seed: int = 1234
    objective: str = "flow_matching"      # what a step trains: a name of magi_train.objectives.OBJECTIVES
    max_steps: int = 1000                 # optimizer steps
    grad_accum_steps: int = 1             # microbatches per optimizer step (each one data.batch_size samples)
    grad_clip: float = 1.0                # max global grad norm; 0 = no clipping (the norm is still logged)
    device: str = "auto"                  # auto: cuda when available
    precision: str = "auto"               # auto: bf16 autocast on GPU, fp32 on CPU
    recompute: str = "none"               # activation recompute per block in backward: none | full (the whole
                                          # block) | selective (keeps the attention kernels' outputs, recomputes
                                          # the linears, norms and MLP: most of the memory saving at a fraction
                                          # of the cost at long sequences, where attention is half the FLOPs)
    recompute_every: int = 1              # recompute every k-th block (0, k, 2k, ... of each stage); the others
                                          # keep all their activations
    recompute_keep: list[str] = field(default_factory=lambda: list(DEFAULT_RECOMPUTE_KEEP))  # selective: linears
                                          # whose GEMM output is kept, not run again (qkv = q/qx/k/v, proj, fc1,
                                          # fc2); each costs its output's memory a block (magi_train.plan)
    recompute_keep_extra: list[str] = field(default_factory=list)   # selective: linears also kept in the last
                                          # recompute_extra_blocks blocks of each stage (e.g. [fc1]: what does not
                                          # fit in every block fits in some; magi_train.plan says how many)
    recompute_extra_blocks: int = 0       # how many blocks (the last ones of each stage) keep recompute_keep_extra
    compile: bool = False                 # torch.compile each transformer block (recompute inside the graph)
    fp8: str = "none"                     # fp8 GEMMs in the block linears: none | torchao (torchao.float8) | te
                                          # (Transformer Engine linears, model.layer_spec te or auto)
    fp8_recipe: str = "auto"              # torchao: tensorwise | rowwise; te: delayed | current | block (scaling)
    fp8_all_gather: bool = False          # torchao tensorwise under FSDP2: all-gather the weights in fp8
    init_from: Optional[str] = None       # a MAGI-1 checkpoint ({load} or .../inference_weight) to start from
    trainable: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names to train; [] = all
    frozen: list[str] = field(default_factory=list)     # patterns frozen (applied after `trainable`)
    log_every: int = 10                   # steps between log lines (metrics.jsonl gets every step)
    progress_bar: bool = True
    peak_tflops: Optional[float] = None   # accelerator peak for MFU; None = looked up from the device name
    profile_steps: list[int] = field(default_factory=list)  # steps run under torch.profiler (CPU + CUDA): each
                                          # writes profile/step_<N>.summary.txt and a Chrome trace to the run dir
    resume_partial: bool = False          # resume from a checkpoint of another model shape: load the tensors that
                                          # fit, keep the initial values of the others (and say which); else stop
    max_nonfinite_steps: int = 10         # stop (exit 5) after this many consecutive steps with a non-finite loss
                                          # or gradient norm; 0 = never
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        p = "train"
        _int(self.seed, f"{p}.seed", 0)
        from magi_train.objectives import OBJECTIVES   # late: the objectives import the diffusion code

        check_choice(self.objective, f"{p}.objective", tuple(OBJECTIVES))
        _int(self.max_steps, f"{p}.max_steps")
        _int(self.grad_accum_steps, f"{p}.grad_accum_steps")
        check(self.grad_clip >= 0, f"{p}.grad_clip", f"must be >= 0, got {self.grad_clip}")
        check_choice(self.device, f"{p}.device", DEVICES)
        check_choice(self.precision, f"{p}.precision", PRECISIONS)
        check_choice(self.recompute, f"{p}.recompute", RECOMPUTE_MODES)
        _int(self.recompute_every, f"{p}.recompute_every")
        check(isinstance(self.recompute_keep, (list, tuple)), f"{p}.recompute_keep",
              f"must be a list of {', '.join(RECOMPUTE_KEEP)}, got {self.recompute_keep!r}")
        for name in self.recompute_keep:
            check_choice(name, f"{p}.recompute_keep", RECOMPUTE_KEEP)
        check(isinstance(self.recompute_keep_extra, (list, tuple)), f"{p}.recompute_keep_extra",
              f"must be a list of {', '.join(RECOMPUTE_KEEP)}, got {self.recompute_keep_extra!r}")
        for name in self.recompute_keep_extra:
            check_choice(name, f"{p}.recompute_keep_extra", RECOMPUTE_KEEP)
        _int(self.recompute_extra_blocks, f"{p}.recompute_extra_blocks", 0)
        if self.recompute_extra_blocks:
            check(self.recompute == "selective" and bool(self.recompute_keep_extra), f"{p}.recompute_extra_blocks",
                  f"{self.recompute_extra_blocks} blocks keep train.recompute_keep_extra under train.recompute="
                  f"selective only; got recompute={self.recompute!r}, recompute_keep_extra={self.recompute_keep_extra}")
        check_choice(self.fp8, f"{p}.fp8", FP8_MODES)
        check(self.fp8 != "none" or self.fp8_recipe == "auto", f"{p}.fp8_recipe",
              f"{self.fp8_recipe!r} is a recipe of train.fp8 torchao (tensorwise, rowwise) or te (delayed, current, "
              f"block); train.fp8 is 'none'")
        check_choice(self.fp8_recipe, f"{p}.fp8_recipe", FP8_RECIPES[self.fp8])
        if self.fp8_all_gather:
            check(self.fp8 == "torchao" and self.fp8_recipe in ("auto", "tensorwise"), f"{p}.fp8_all_gather",
                  "torchao offers fp8 all-gather for train.fp8=torchao with fp8_recipe tensorwise only")
        _int(self.log_every, f"{p}.log_every")
        check(isinstance(self.resume_partial, bool), f"{p}.resume_partial",
              f"must be true or false, got {self.resume_partial!r}")
        _int(self.max_nonfinite_steps, f"{p}.max_nonfinite_steps", 0)
        check(isinstance(self.profile_steps, (list, tuple)) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.profile_steps),
            f"{p}.profile_steps", f"must be a list of step numbers >= 1, got {self.profile_steps!r}")
        if self.peak_tflops is not None:
            check(self.peak_tflops > 0, f"{p}.peak_tflops", f"must be > 0, got {self.peak_tflops}")


__all__ = ["TrainConfig", "FlowMatchingConfig", "OptimizerConfig", "ScheduleConfig", "EMAConfig", "CheckpointConfig",
           "WandbConfig", "ValidationConfig", "EvaluationConfig"]
