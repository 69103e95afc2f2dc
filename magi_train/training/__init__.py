"""Training core: the runtime (one path for every layout, one process included), optimizer, EMA, checkpoints,
metrics, the loop. The objective a step trains lives in magi_train.objectives; the model's parallel form in
magi_train.parallel (parallelize), reached through runtime.py."""
from .build import autocast_dtype, build_train_loader, build_validation_batches, resolve_device
from magi_train.checkpoint.manager import CheckpointManager, step_dir_name
from .ema import EMA, clean_name
from .flops import forward_flops, peak_flops_per_second, train_flops
from .loop import Trainer
from .metrics import MetricsLogger, read_metrics
from .optim import build_lr_scheduler, build_optimizer, lr_factor
from .preemption import PreemptionFlag
from .runtime import TrainingRuntime
from .seeding import microbatch_generator, seed_everything, step_generator
from .synthetic_batches import SyntheticBatches
from .validation import validate

__all__ = ["autocast_dtype", "build_train_loader", "build_validation_batches", "resolve_device",
           "CheckpointManager", "step_dir_name", "EMA", "clean_name", "forward_flops", "peak_flops_per_second",
           "train_flops", "MetricsLogger", "read_metrics", "build_lr_scheduler", "build_optimizer", "lr_factor",
           "PreemptionFlag", "seed_everything", "step_generator", "SyntheticBatches", "validate", "Trainer",
           "TrainingRuntime", "microbatch_generator"]
