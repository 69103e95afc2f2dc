"""The one training runtime: every run, one process included (the trivial layout), gets its process groups,
its model and the reductions that make its numbers those of the whole job from here, through
magi_train.parallel.parallelize.

    rt = TrainingRuntime(cfg, device)          # torch.distributed + megatron-core groups (torchrun's env), or none
    model = rt.build_model(cfg, init_from)     # layer spec, TP, CP, PP stage, freezing, AC, compile, FSDP/DDP
    rt.attach_optimizer(optimizer, cfg)        # dp_mode=deepspeed: the DeepSpeed engine over model + AdamW
    norm, skipped = rt.optimizer_step(optimizer, max_norm)   # global norm, clipping, update
    teacher = rt.build_frozen(model_cfg, path) # a frozen auxiliary model (distillation), placed the same way
    loss = rt.mean_over_dp(loss); norm = rt.clip_grad_norm(max_norm); rt.reduce_tbins(tbins)

Initial weights equal one process's whenever that is affordable: a MAGI-1 checkpoint (train.init_from) is
read one tensor at a time into this rank's shard; without one, models up to SAME_INIT_MAX_PARAMS parameters
are built whole, as one process builds them (same seed, same device type), and cut into this rank's shard, so
a layout trains the very model one process trains. Larger ones take magi_train.parallel's seeded per-tensor
init, built shard by shard."""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from magi_train.config import ConfigError, MagiConfig, TrainConfig
from magi_train.dtypes import DTYPES
from magi_train.model import build_dit

from .freeze import freezing_counts, is_trainable

log = logging.getLogger("magi_train")

# whole-model fp32 init per process: 4 GiB at most, once, before sharding
SAME_INIT_MAX_PARAMS = 1_000_000_000


def data_parallel_coords(rank: int, world_size: int, parallel) -> tuple[int, int]:
    """(dp_rank, dp_size) in Megatron's tp-cp-dp-pp order: ranks of one model-parallel group share the data."""
    dp = parallel.resolved_dp(world_size)
    return (rank // (parallel.tp * parallel.cp)) % dp, dp


def model_transforms(train_cfg: TrainConfig):
    """The train.* keys parallelize applies per shell: freezing by name, activation recompute, compile, fp8."""
    from magi_train.parallel.recompute import RecomputePolicy
    from magi_train.parallel.transforms import ModelTransforms
    from magi_train.precision.fp8_training import Fp8Settings

    return ModelTransforms(trainable=partial(is_trainable, trainable=train_cfg.trainable, frozen=train_cfg.frozen),
                           recompute=RecomputePolicy(train_cfg.recompute, train_cfg.recompute_every,
                                                     tuple(train_cfg.recompute_keep),
                                                     tuple(train_cfg.recompute_keep_extra),
                                                     train_cfg.recompute_extra_blocks),
                           compile=train_cfg.compile,
                           fp8=Fp8Settings(train_cfg.fp8, train_cfg.fp8_recipe, train_cfg.fp8_all_gather))


def _checkpoint_getter(path: str, key: str):
    """name -> whole tensor of a MAGI-1 checkpoint, read one tensor at a time; a bad path is one line naming key."""
    from magi_train.checkpoint.release_reader import magi_tensor_getter

    try:
        return magi_tensor_getter(path, fp8=False)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{key}: {e}") from None


def _parallelize(key: str, model_cfg, **kwargs) -> nn.Module:
    """parallelize, with a checkpoint that does not fit the model as one line naming the config key."""
    from magi_train.checkpoint.magi_format import CheckpointMismatch
    from magi_train.parallel import parallelize

    try:
        return parallelize(model_cfg, **kwargs)
    except CheckpointMismatch as e:
        raise ValueError(f"{key}: {e}") from None


class TrainingRuntime:
    def __init__(self, cfg: MagiConfig, device: torch.device):
        from magi_train.parallel import init_parallel

        pcfg = cfg.parallel
        backend = "nccl" if device.type == "cuda" else "gloo"
        if pcfg.backend == "auto":
            pcfg = dataclasses.replace(pcfg, backend=backend)
        elif pcfg.backend != backend:
            raise ConfigError(f"parallel.backend: {pcfg.backend!r} does not run on train.device={device.type}; "
                              f"use 'auto' or {backend!r}")
        self.env = init_parallel(pcfg)
        if self.env.distributed:
            expected = data_parallel_coords(self.env.rank, self.env.world_size, pcfg)
            if expected != (self.env.dp_rank, self.env.dp):
                raise RuntimeError(f"data-parallel coordinates of rank {self.env.rank}: megatron-core says "
                                   f"{(self.env.dp_rank, self.env.dp)}, the tp-cp-dp-pp order says {expected}")
        self.model: nn.Module | None = None
        self.num_trainable = self.num_params = 0

    @property
    def plan(self):
        return self.model.magi_parallel

    def named_parameters(self):
        """(MAGI-1 name, this rank's parameter), each name once."""
        return self.plan.named_parameters()

    # ------------------------------------------------------------------ model
    def build_model(self, cfg: MagiConfig, init_from: str | None) -> nn.Module:
        """The trained model of this rank: fp32 master weights, from `init_from` (a MAGI-1 checkpoint) or from
        the init one process draws (models up to SAME_INIT_MAX_PARAMS)."""
        from magi_train.precision.fp8_training import resolve_layer_spec

        # fp32 master weights, as one process; train.fp8=te builds TE's linears (model.layer_spec auto -> te)
        model_cfg = dataclasses.replace(cfg.model, params_dtype="float32",
                                        layer_spec=resolve_layer_spec(cfg.train.fp8, cfg.model.layer_spec))
        meta = build_dit(model_cfg, device="meta")
        sizes = {n: p.numel() for n, p in meta.named_parameters()}
        self.num_trainable, self.num_params = freezing_counts(sizes, cfg.train.trainable, cfg.train.frozen)
        full_state = None
        if init_from:
            full_state = _checkpoint_getter(init_from, "train.init_from")
        elif self.num_params <= SAME_INIT_MAX_PARAMS:
            from magi_train.checkpoint.release_reader import one_process_state

            # what one process draws (the Trainer seeds seed + rank afterwards, rank 0 there)
            full_state = one_process_state(model_cfg, cfg.train.seed, self.env.device, torch.float32)
        else:
            log.info("%.2fB parameters: seeded per-shard init (not one process's init)", self.num_params / 1e9)
        self.model = _parallelize("train.init_from", model_cfg, env=self.env, full_state=full_state,
                                  seed=cfg.train.seed, transforms=model_transforms(cfg.train))
        if init_from:
            log.info("initialised from MAGI-1 checkpoint %s", init_from)
        return self.model

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, cfg: MagiConfig) -> None:
        """parallel.dp_mode=deepspeed: hand the model and its AdamW to DeepSpeed (the engine reduces, clips and
        steps; the AdamW object stays the one the lr scheduler drives). Other modes: nothing to do."""
        if cfg.parallel.dp_mode == "deepspeed":
            from magi_train.parallel.deepspeed_engine import attach

            attach(self.model, optimizer, cfg.parallel.deepspeed, cfg.train.grad_clip, cfg.data.batch_size)

    @property
    def engine(self):
        """The DeepSpeed engine of dp_mode=deepspeed, else None."""
        return self.plan.engine

    def ema_targets(self):
        """(name, tensor) the EMA follows: this rank's parameters (ZeRO-3: its partitions of them)."""
        if self.engine is not None:
            from magi_train.parallel.deepspeed_state import ema_targets

            return ema_targets(self.plan)
        return self.named_parameters()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        if self.engine is None:   # DeepSpeed clears its gradient partitions itself after each step
            optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_norm: float,
                       mark=None) -> tuple[float, bool]:
        """The global gradient norm, clipping to max_norm, and the update unless the norm is not finite.
        Returns (norm before clipping, skipped). mark("grad_norm"), when given, follows the clipping."""
        if self.engine is not None:
            from magi_train.parallel.deepspeed_engine import optimizer_step

            return optimizer_step(self.plan)
        norm = self.clip_grad_norm(max_norm)
        if mark is not None:
            mark("grad_norm")
        skipped = not math.isfinite(norm)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        return norm, skipped

    def init_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Create the optimizer's per-parameter state (a zero-lr step) so a checkpoint can be loaded into it."""
        if self.engine is not None:
            from magi_train.parallel.deepspeed_state import init_optimizer_state

            return init_optimizer_state(self.plan, optimizer)
        from magi_train.checkpoint.sharded import init_optimizer_state

        init_optimizer_state(optimizer)

    def build_frozen(self, model_cfg, path: str, key: str) -> nn.Module:
        """A frozen auxiliary model (a distillation teacher) from the MAGI-1 checkpoint at `path`, in this run's
        layout: the same TP/CP/PP cut, and sharded by FSDP like the trained model, so no rank holds a second
        whole copy. `key` names the config field of `path` in errors. Runs in eval mode, without gradients."""
        model_cfg = dataclasses.replace(model_cfg, params_dtype="float32")
        getter = _checkpoint_getter(path, key)
        from magi_train.parallel.transforms import ModelTransforms

        frozen = ModelTransforms(trainable=lambda name: False)
        model = _parallelize(key, model_cfg, env=self.env, full_state=getter, seed=0, transforms=frozen)
        return model.eval()

    # ------------------------------------------------------------------ reductions
    def mean_over_dp(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss over the whole global batch (each replica computed the mean of its microbatches)."""
        loss = loss.detach().float().clone().to(self.env.device)
        if self.env.dp_group is not None:
            dist.all_reduce(loss, group=self.env.dp_group)
            loss /= self.env.dp
        return loss

    def clip_grad_norm(self, max_norm: float) -> float:
        from magi_train.parallel.grads import clip_grad_norm_

        return clip_grad_norm_(self.plan, max_norm)

    def loss_owner(self) -> bool:
        """One rank per model replica contributes its per-chunk losses: the last pipeline stage's first
        tp/cp rank (the others compute the same numbers or none)."""
        env = self.env
        return env.pp_rank == env.pp - 1 and env.tp_rank == 0 and env.cp_rank == 0

    def reduce_tbins(self, tbins) -> None:
        """Per-t-bin sums and counts of the whole job, on every rank."""
        n = len(tbins.sums)
        buf = torch.tensor(tbins.sums + tbins.counts, dtype=torch.float64, device=self.env.device)
        if not self.loss_owner():
            buf.zero_()
        if self.env.distributed:
            dist.all_reduce(buf)
        values = buf.cpu().tolist()
        tbins.sums, tbins.counts = values[:n], [int(round(c)) for c in values[n:]]

    # ------------------------------------------------------------------ export, end
    def export(self, ema, out_dir, dtype: str):
        """MAGI-1 safetensors from this layout (EMA weights when given); the directory on rank 0. A distilled
        (dt-conditioned) model goes into out_dir/inference_weight.distill/, the release's distill layout."""
        from pathlib import Path

        from magi_train.checkpoint.sharded import export_magi

        if self.plan.model_cfg.distill:
            out_dir = Path(out_dir) / "inference_weight.distill"
        tensors = dict(ema.shadow) if ema is not None else None
        if self.engine is not None:   # DeepSpeed's partitions, gathered whole one tensor at a time
            from magi_train.parallel.deepspeed_state import ExportTensors

            tensors = ExportTensors(self.plan, ema)
        return export_magi(self.model, out_dir, DTYPES[dtype],
                           tensors=tensors)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        from magi_train.parallel import destroy_parallel

        dist.barrier()
        destroy_parallel()


__all__ = ["TrainingRuntime", "SAME_INIT_MAX_PARAMS", "model_transforms", "data_parallel_coords"]
