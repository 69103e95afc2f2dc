"""Training core: objective step, optimizer, EMA, checkpoints, metrics, the loop.

One process uses the builders of build.py and `forward_backward` of step.py; several processes (or tp/cp/pp > 1)
get their model, forward_backward, reductions and layout-independent checkpoints from magi_train.parallel
through parallel_runtime.py and layout_checkpoint.py."""
from .build import autocast_dtype, build_model, build_train_loader, build_validation_batches, resolve_device, wrap_model
from .checkpoint import CheckpointManager, step_dir_name
from .ema import EMA, clean_name
from .export import export_magi, export_state_dict
from .flops import forward_flops, peak_flops_per_second, train_flops
from .freeze import apply_freezing
from .loop import Trainer
from .parallel_runtime import ParallelRuntime
from .metrics import MetricsLogger, read_metrics
from .optim import build_lr_scheduler, build_optimizer, lr_factor
from .preemption import PreemptionFlag
from .seeding import microbatch_generator, seed_everything, step_generator
from .step import forward_backward
from .synthetic_batches import SyntheticBatches
from .validation import validate

__all__ = ["autocast_dtype", "build_model", "build_train_loader", "build_validation_batches", "resolve_device",
           "wrap_model", "CheckpointManager", "step_dir_name", "EMA", "clean_name", "export_magi",
           "export_state_dict", "forward_flops", "peak_flops_per_second", "train_flops", "apply_freezing",
           "MetricsLogger", "read_metrics", "build_lr_scheduler", "build_optimizer", "lr_factor",
           "PreemptionFlag", "seed_everything", "step_generator", "forward_backward", "SyntheticBatches",
           "validate", "Trainer", "ParallelRuntime", "microbatch_generator"]
