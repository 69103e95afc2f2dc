"""The training loop: build everything, resume, step, log, validate, checkpoint, export, stop on signals.

    trainer = Trainer(cfg)      # builds and resumes; config-level problems raise here
    exit_code = trainer.fit()   # 0 when finished or preempted (checkpoint written)

Step numbers count completed optimizer steps: checkpoint step_00000100 holds the state after 100 updates, and
the metrics line of step 100 describes the update that made it.

One path for every layout, one process included (the trivial layout): runtime.py builds this rank's part of the
model through magi_train.parallel.parallelize, magi_train.parallel.forward_backward runs its forward/backward,
and the loop reduces what it reports over the job (loss over the data-parallel ranks, the global gradient norm)
and saves layout-independent checkpoints (magi_train/checkpoint/training_state.py). What a step trains is the objective
(magi_train.objectives, `train.objective`). Microbatches are numbered as one process would number them (data and
noise), so a layout trains the same model on the same samples as one process with the same global batch:
data-parallel size x microbatches per rank x data.batch_size."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from magi_train.config import ConfigError
from magi_train.config import MagiConfig, validate_config
from magi_train.data.config import DataConfig
from magi_train.diffusion import TBinStats
from magi_train.objectives import build_objective
from magi_train.parallel import forward_backward

from .build import autocast_dtype, build_train_loader, build_validation_batches, resolve_device
from magi_train.checkpoint.manager import (CheckpointManager, pack_rank_state, rank_key, rng_state, set_rng_state,
                                           step_dir_name, unpack_rank_state)
from magi_train.checkpoint.fallback import load_newest_loadable
from magi_train.checkpoint.disk_space import check_writable, guarded_save
from .divergence_guard import DivergenceGuard
from .ema import EMA
from .flops import peak_flops_per_second, train_flops
from magi_train.checkpoint.training_state import (FORMAT, data_key, has_entry, is_layout_independent, load_one_process_checkpoint,
                                restore_lr, saved_keys, tensor_state)
from .batch_lookahead import LookaheadBatches
from .metrics import MetricsLogger, peak_memory_gib
from .optim import build_lr_scheduler, build_optimizer
from .preemption import PreemptionFlag
from .profiling import StepProfiler, StepTimeline
from magi_train.checkpoint.fit_check import fit_to_checkpoint
from .periodic_eval import build_periodic_eval
from .run_lock import RunLock
from .runtime import TrainingRuntime, data_parallel_coords
from .seeding import microbatch_generator, seed_everything
from .validation import validate

log = logging.getLogger("magi_train")

# Fault injection for the kill/resume tests: stall inside step K (after backward) or inside the save of step K
# (after the data is written, before the rename), writing a marker file so the test knows when to strike.
FAULT_STALL_STEP = "MAGI_FAULT_STALL_STEP"
FAULT_STALL_SAVE = "MAGI_FAULT_STALL_SAVE"


def distributed_info() -> tuple[int, int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def config_as_dict(cfg: MagiConfig) -> dict:
    return dataclasses.asdict(cfg)


def _stall(marker: Path, flag: PreemptionFlag | None, seconds: float = 600.0) -> None:
    marker.write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (flag is not None and flag.requested):
        time.sleep(0.01)


class Trainer:
    def __init__(self, cfg: MagiConfig, flag: PreemptionFlag | None = None):
        self.cfg = cfg
        self.flag = flag if flag is not None else PreemptionFlag()   # train.py installs it before start-up
        self.rank, self.world_size, local_rank = distributed_info()
        validate_config(cfg, self.world_size)
        self.micro_per_step = self._microbatches_per_step(cfg)
        self.mp_size = cfg.parallel.model_parallel_size
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self.lock = RunLock(self.run_dir) if self.rank == 0 else None   # before anything reads or writes it
        if self.rank == 0:
            check_writable(self.run_dir / "checkpoints")
        self.runtime: TrainingRuntime | None = TrainingRuntime(cfg, resolve_device(cfg.train, local_rank))
        env = self.runtime.env
        self.rank, self.dp_rank, self.dp_size, self.device = env.rank, env.dp_rank, env.dp, env.device
        self.amp_dtype = autocast_dtype(cfg.train, self.device)
        if cfg.model.attention_backend == "cudnn_fp8":  # one line at start, not a traceback at the first step
            from magi_train.model.attention_fp8 import require_cudnn_fp8

            require_cudnn_fp8(self.device, cfg.model.kv_channels)
        seed_everything(cfg.train.seed + self.rank)

        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.train.checkpoint.keep_last)
        resume_from = self._resume_candidates()
        # a resumed run takes every weight from its checkpoint: reading the MAGI-1 release again would be wasted
        init_from = None if resume_from else cfg.train.init_from
        self.model = self.runtime.build_model(cfg, init_from)
        self.num_trainable, self.num_params = self.runtime.num_trainable, self.runtime.num_params
        seed_everything(cfg.train.seed + self.rank)
        # a pipeline stage may hold no trained parameter (everything it holds frozen)
        self.optimizer = build_optimizer(self.model, cfg.train.optimizer, allow_empty=True)
        self.runtime.attach_optimizer(self.optimizer, cfg)   # dp_mode=deepspeed: the engine steps this AdamW
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.train.schedule, cfg.train.max_steps)
        self.ema = self._new_ema() if cfg.train.ema.enabled else None
        self.loader = build_train_loader(cfg, self.dp_rank, self.dp_size)
        self.batches = LookaheadBatches(self.loader)
        self.raw_encoder = None
        if isinstance(cfg.data, DataConfig) and cfg.data.kind == "raw":
            from .raw_encoding import RawBatchEncoder
            self.raw_encoder = RawBatchEncoder(cfg.encoders, cfg.model)
        v = cfg.train.validation
        # every rank evaluates the same held-out batches (the one-process ones): FSDP and pipeline stages need
        # every rank in each forward, and the numbers equal one process's
        self.val_batches = build_validation_batches(cfg, v.batches) if v.every_steps else []
        self.val_batches = [self._encode(b) for b in self.val_batches]
        if v.every_steps and not self.val_batches:
            log.warning("train.validation.every_steps=%d but there is no held-out data (data.val_shards): "
                        "no validation", v.every_steps)

        self.objective = build_objective(cfg, self.runtime, self.model)
        self.periodic_eval = build_periodic_eval(cfg, self.run_dir, self.device, self.amp_dtype, self._encode,
                                                 parallel=self.runtime.env.distributed or self.mp_size > 1)
        self.tbins = TBinStats(cfg.train.flow.t_bins)
        self.step = 0
        self.last_saved_step = -1
        self.peak_flops = peak_flops_per_second(self.device, cfg.train.peak_tflops)
        self.profiler = StepProfiler(cfg.train.profile_steps, self.run_dir, self.device, self.rank, self.world_size)
        if resume_from:   # checked and loaded before config.yaml is written or anything pruned
            path = load_newest_loadable(resume_from, self.load_checkpoint, fallback=cfg.resume == "auto")
            log.info("resumed from %s at step %d", path, self.step)
        self._prepare_run_dir()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _microbatches_per_step(cfg: MagiConfig) -> int:
        """train.grad_accum_steps; with pipeline stages, parallel.pp_microbatches (the schedule's count)."""
        p, accum = cfg.parallel, cfg.train.grad_accum_steps
        if p.pp == 1:
            return accum
        if accum not in (1, p.pp_microbatches):
            raise ConfigError(f"train.grad_accum_steps: with parallel.pp={p.pp} each step runs "
                              f"parallel.pp_microbatches={p.pp_microbatches} microbatches; set grad_accum_steps to 1 "
                              f"or {p.pp_microbatches}, got {accum}")
        return p.pp_microbatches

    def _new_ema(self) -> EMA:
        e = self.cfg.train.ema
        return EMA(None, e.decay, e.warmup, named_parameters=self.runtime.ema_targets())

    def _prepare_run_dir(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / ".config.yaml.tmp"
            tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config_as_dict(self.cfg))))
            os.replace(tmp, self.run_dir / "config.yaml")
        if dist.is_initialized():
            dist.barrier()
        self.checkpoints.clean_leftovers()

    def _resume_candidates(self) -> list[Path]:
        """The checkpoints to resume from, newest first (resume=auto falls back to older ones)."""
        resume = self.cfg.resume
        if resume == "none":
            if self.checkpoints.complete_steps():
                raise ValueError(f"resume: {self.checkpoints.directory} already holds checkpoints; pass resume=auto "
                                 f"to continue that run or choose another name=")
            return []
        if resume == "auto":
            return [self.checkpoints.directory / step_dir_name(s) for s in reversed(self.checkpoints.complete_steps())]
        path = Path(resume)
        if not (path / ".metadata").is_file():
            raise ValueError(f"resume: {path} is not a complete checkpoint directory (no .metadata)")
        return [path]

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        """This run's state in the layout-independent format (magi_train/checkpoint/training_state.py)."""
        state = tensor_state(self.runtime.plan, self.runtime.named_parameters(), self.optimizer, self.ema)
        state.update({
            "scheduler": pack_rank_state(self.scheduler.state_dict()),
            "trainer": {"step": self.step, "world_size": self.world_size, "dp_size": self.dp_size, "format": FORMAT},
            rank_key(self.rank): pack_rank_state({"rng": rng_state()}),
            data_key(self.dp_rank): pack_rank_state({"data": self.batches.state_dict()}),
        })
        return state

    def save_checkpoint(self) -> Path:
        stall = os.environ.get(FAULT_STALL_SAVE)
        hook = None
        if stall and int(stall) == self.step:
            hook = lambda tmp: _stall(self.run_dir / f"stalled_in_save_{self.step}", None)  # noqa: E731
        state = self._state()
        path = guarded_save(lambda: self.checkpoints.save(self.step, state, before_rename=hook),
                            self.checkpoints.directory, self.step, state, self.checkpoints.latest(),
                            self.checkpoints.clean_leftovers)
        self.last_saved_step = self.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Resume from a checkpoint of any layout, or from one written by the one-process format of earlier
        versions (whole tensors, read one parameter at a time)."""
        from magi_train.checkpoint.sharded import after_load

        keys = saved_keys(path)
        self.runtime.init_optimizer_state(self.optimizer)   # the AdamW moments must exist for the load to fill them
        state = self._state()
        mine, my_data = rank_key(self.rank), data_key(self.dp_rank)
        one_process = not is_layout_independent(keys)
        saved = {mine: has_entry(keys, mine) and not one_process, "ema": has_entry(keys, "ema"),
                 my_data: has_entry(keys, rank_key(0)) if one_process else has_entry(keys, my_data)}
        for key, present in saved.items():
            if key in state and not present:
                state.pop(key)
        fitted = fit_to_checkpoint(path, state, self.cfg.train.resume_partial, self.cfg.model,
                                   same_format=not one_process, stage_only=self.cfg.parallel.pp > 1)
        if one_process:
            load_one_process_checkpoint(path, state)
        else:
            CheckpointManager.load(path, state, allow_partial=fitted.partial)
        after_load(self.model, self.optimizer, self.ema)   # pipeline-shared copies take the loaded first copy
        self.scheduler.load_state_dict(unpack_rank_state(state["scheduler"]))
        restore_lr(self.optimizer, self.scheduler)
        if self.ema is not None and "ema" in state:
            self.ema.updates = int(state["ema"]["updates"])
        elif self.ema is not None:
            log.warning("resume: %s holds no EMA weights; the EMA starts from the loaded weights", path)
            self.ema = self._new_ema()
        trainer = state["trainer"]
        self.step = self.last_saved_step = int(trainer["step"])
        if mine in state and int(trainer["world_size"]) == self.world_size:
            set_rng_state(unpack_rank_state(state[mine])["rng"])
        if my_data in state and int(trainer["dp_size"]) == self.dp_size:
            self.batches.load_state_dict(unpack_rank_state(state[my_data])["data"])
        else:
            log.warning("resume: checkpoint was written by %s data-parallel ranks, this run has %d: the data "
                        "position starts fresh", trainer["dp_size"], self.dp_size)
            self.batches = LookaheadBatches(self.loader)

    # ------------------------------------------------------------------ one step
    def _encode(self, batch: dict) -> dict:
        return self.raw_encoder(batch) if self.raw_encoder is not None else batch

    def _next_batch(self) -> dict:
        return self._encode(next(self.batches))

    def train_step(self, timeline: StepTimeline | None = None) -> dict:
        """One optimizer step; timeline (train.profile_steps) marks its phases on the GPU."""
        cfg = self.cfg.train
        mark = timeline.mark if timeline is not None else (lambda name: None)
        micro, flops, tokens, samples, keys = [], 0.0, 0, 0, []
        for m in range(self.micro_per_step):
            batch = self._next_batch()
            keys += list(batch.get("key", ()))
            g = microbatch_generator(cfg.seed, self.step, m, self.dp_rank, self.dp_size, self.device)
            micro.append(self.objective.prepare(batch, g, self.step))
            B, _, T, H, W = batch["latent"].shape
            L = batch["text_emb"].shape[1]
            flops += B * train_flops(self.cfg.model, T, H, W, L)
            tokens += B * self.cfg.model.tokens_per_frame(H, W) * (T // self.cfg.model.t_patch_size)
            samples += B
        self.runtime.zero_grad(self.optimizer)
        mark("batch")
        loss = forward_backward(self.model, micro, self.objective.loss, autocast_dtype=self.amp_dtype)
        mark("forward_backward")
        if self.step + 1 < cfg.max_steps:
            self.batches.fetch_ahead()   # while the GPU still runs the backward
        stall = os.environ.get(FAULT_STALL_STEP)
        if stall and int(stall) == self.step + 1:
            _stall(self.run_dir / f"stalled_at_step_{self.step + 1}", self.flag)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        loss = self.runtime.mean_over_dp(loss)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm, skipped = self.runtime.optimizer_step(self.optimizer, max_norm, mark)
        mark("optimizer")
        if skipped:
            log.warning("step %d: non-finite gradient norm, update skipped (samples: %s)", self.step + 1,
                        ", ".join(map(str, keys)) or "synthetic")
        self.scheduler.step()
        self.step += 1
        if self.ema is not None and not skipped and self.step % self.cfg.train.ema.update_every == 0:
            self.ema.update()
        self.tbins.reset()
        chunk_losses = self.objective.loss.pop()
        if chunk_losses:     # pipeline stages before the last compute no loss
            for (kwargs, _, weight), per_chunk in zip(micro, chunk_losses, strict=True):
                self.tbins.add(per_chunk, kwargs["t"], weight)
        self.runtime.reduce_tbins(self.tbins)
        mark("after")
        out = {"loss": float(loss), "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
               "_flops": flops, "_tokens": tokens, "_samples": samples}
        out.update({f"loss/{k}": v for k, v in self.tbins.summary().items()})
        return out

    # ------------------------------------------------------------------ loop
    def _rates(self, m: dict, seconds: float) -> dict:
        flops, tokens, samples = m.pop("_flops"), m.pop("_tokens"), m.pop("_samples")
        m["step_time_s"] = seconds
        m["samples_per_s"] = samples * self.dp_size / seconds       # whole job
        m["tokens_per_s"] = tokens * self.dp_size / seconds
        m["peak_mem_gib"] = peak_memory_gib(self.device)
        flops_per_device = flops / self.mp_size                      # a model-parallel group shares its samples
        m["tflops_per_device"] = flops_per_device / seconds / 1e12
        m["mfu"] = flops_per_device / seconds / self.peak_flops if self.peak_flops else None
        return m

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def export(self) -> Path | None:
        c = self.cfg.train.checkpoint
        out = self.run_dir / "export" / f"step_{self.step:08d}"
        return self.runtime.export(self.ema if c.export_ema else None, out, c.export_dtype)

    def close(self) -> None:
        """Release the run directory and the signal handlers; tear down the process groups of a parallel run."""
        self.flag.restore()
        if self.lock is not None:
            self.lock.release()
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    def fit(self) -> int:
        cfg = self.cfg.train
        logger = MetricsLogger(self.run_dir, self.cfg, self.rank, self.step, config_as_dict(self.cfg))
        divergence = DivergenceGuard(cfg.max_nonfinite_steps)
        logger.write_line(f"{self.cfg.name}: {self.num_params / 1e6:.2f}M parameters "
                          f"({self.num_trainable / 1e6:.2f}M trained), device {self.device}, "
                          f"precision {self.amp_dtype or torch.float32}, from step {self.step}, run dir {self.run_dir}")
        try:
            while self.step < cfg.max_steps:
                if self.flag.agreed(self.device):
                    saved = self.step > 0 and self.last_saved_step != self.step and divergence.healthy
                    if saved:
                        self.save_checkpoint()
                    logger.write_line(self.flag.stop_line(self.step, saved))
                    return 0
                timeline = self.profiler.timeline(self.step + 1)
                with self.profiler.profile(self.step + 1, timeline):
                    t0 = time.perf_counter()
                    metrics = self.train_step(timeline)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    seconds = time.perf_counter() - t0
                logger.log(self.step, self._rates(metrics, seconds))
                divergence.after_step(self.step, not metrics["skipped"] and math.isfinite(metrics["loss"]),
                                      self.last_saved_step)
                if self._due(cfg.validation.every_steps) and self.val_batches:
                    logger.log(self.step, validate(self.model, self.val_batches, cfg.flow, self.cfg.model.chunk_width,
                                                   cfg.validation.t_values, cfg.validation.seed, self.device,
                                                   self.amp_dtype), kind="val")
                if self.periodic_eval is not None and self._due(cfg.evaluation.every_steps):
                    self.periodic_eval(self.model, self.ema, self.step, logger)
                if divergence.should_save(self._due(cfg.checkpoint.every_steps)):
                    self.save_checkpoint()
                if self._due(cfg.checkpoint.export_every_steps) and divergence.healthy:
                    self.export()
            if cfg.checkpoint.save_at_end and self.last_saved_step != self.step and divergence.healthy:
                self.save_checkpoint()
            if cfg.checkpoint.export_at_end and divergence.healthy:
                where = self.export()
                if where is not None:
                    logger.write_line(f"exported MAGI-1 weights to {where}")
            return 0
        finally:
            logger.close()
            self.flag.restore()
            if self.lock is not None:
                self.lock.release()


__all__ = ["Trainer", "distributed_info", "data_parallel_coords", "FAULT_STALL_STEP", "FAULT_STALL_SAVE"]
