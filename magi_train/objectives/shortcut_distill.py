"""train.objective=shortcut_distill: MAGI-1 shortcut + CFG distillation of a base model into a step-size
conditioned student (model.distill=true) that magi_infer serves at cfg 1 in 8-16 steps.

Per microbatch (prepare): noise levels as in pre-training (per-chunk monotone t, clean prefix chunks), a step
budget N per sample from distill.budgets / budget_probs, each chunk's t moved to a grid point of N (snap_t), and
the student's input x_t with dt_code = N / 2 (diffusion.shortcut). Targets, all without gradients:
  finest N   the frozen teacher's guided velocity (three passes, MAGI-1's t-bin scales: guided_teacher.py), so the
             student at cfg 1 reproduces guided sampling
  coarser N  two Euler half steps of the target model (the student itself, or an EMA copy) at budget 2N, each
             chunk by its own dt (diffusion.shortcut.two_half_step_target)
Every rank runs every forward (teacher passes, both half steps), whatever its own samples need: FSDP and TP
forwards are collective and the ranks hold different samples. The loss is the per-chunk error of the student's
velocity against the target, clean chunks excluded (weight 0)."""
from __future__ import annotations

import dataclasses

import torch

from magi_train.diffusion import (ChunkNoise, chunk_mse, context_flags, prepare_inputs, sample_chunk_t,
                                  weighted_chunk_loss)
from magi_train.diffusion.shortcut import budget_dt_code, snap_to_grid, step_times, two_half_step_target
from magi_train.grad_accumulation import Microbatch, autocast_context

from .guided_teacher import guided_velocity


def chunk_pseudo_huber(v_pred: torch.Tensor, target: torch.Tensor, num_chunks: int, c: float) -> torch.Tensor:
    """Mean of sqrt(e^2 + c^2) - c per chunk: [B, C, T, H, W] x2 -> [B, n] (fp32)."""
    err = (v_pred.float() - target.float()).square()
    err = (err + c * c).sqrt() - c
    B, C, T, H, W = err.shape
    return err.reshape(B, C, num_chunks, T // num_chunks, H, W).mean(dim=(1, 3, 4, 5))


class DistillLoss:
    """loss_fn(v_pred, target, loss_weight) as forward_backward calls it; keeps each call's per-chunk losses."""

    def __init__(self, kind: str, huber_c: float):
        self.kind, self.huber_c = kind, huber_c
        self.chunk_losses: list[torch.Tensor] = []

    def __call__(self, v_pred: torch.Tensor, target: torch.Tensor, loss_weight: torch.Tensor) -> torch.Tensor:
        n = loss_weight.shape[1]
        per_chunk = (chunk_mse(v_pred, target, n) if self.kind == "mse"
                     else chunk_pseudo_huber(v_pred, target, n, self.huber_c))
        self.chunk_losses.append(per_chunk.detach())
        return weighted_chunk_loss(per_chunk, loss_weight)

    def pop(self) -> list[torch.Tensor]:
        out, self.chunk_losses = self.chunk_losses, []
        return out


def draw_budgets(batch: int, budgets, probs, generator: torch.Generator, device) -> torch.Tensor:
    """[B] float32 step budget per sample."""
    idx = torch.multinomial(torch.tensor(probs, dtype=torch.float32, device=device), batch, replacement=True,
                            generator=generator)
    return torch.tensor(budgets, dtype=torch.float32, device=device)[idx]


class ShortcutDistillObjective:
    name = "shortcut_distill"

    def __init__(self, distill_cfg, flow_cfg, chunk_width: int, device: torch.device, teacher, target,
                 autocast_dtype=None, student=None, student_named=None, target_named=None):
        """teacher: frozen base model; target: the model whose half steps make coarser targets (the student,
        or an EMA copy given with the (name, parameter) pairs of both for its update)."""
        self.cfg, self.flow_cfg, self.chunk_width, self.device = distill_cfg, flow_cfg, chunk_width, device
        self.teacher, self.target, self.autocast_dtype = teacher, target, autocast_dtype
        self.loss = DistillLoss(distill_cfg.loss, distill_cfg.huber_c)
        self._ema_pairs = None
        if student_named is not None:
            mine = dict(target_named)
            self._ema_pairs = [(mine[n], p) for n, p in student_named]
        self._ema_step = None

    # ------------------------------------------------------------------ EMA target
    @torch.no_grad()
    def _update_target(self, step: int) -> None:
        """Once per optimizer step: the EMA copy follows the student (starts as a copy of it, also on resume)."""
        if self._ema_pairs is None or step == self._ema_step:
            return
        keep = 0.0 if self._ema_step is None else self.cfg.target_ema_decay
        local = lambda t: getattr(t, "_local_tensor", t)  # noqa: E731  (a DTensor's shard, updated in place)
        for ema, p in self._ema_pairs:
            local(ema).lerp_(local(p.detach()).to(local(ema).dtype), 1.0 - keep)
        self._ema_step = step

    # ------------------------------------------------------------------ one microbatch
    def levels(self, batch_size: int, n: int, budget: torch.Tensor, generator: torch.Generator) -> ChunkNoise:
        c = self.cfg
        noise = sample_chunk_t(batch_size, n, self.flow_cfg, generator, self.device)
        t = noise.t
        if c.snap_t:
            t = snap_to_grid(t, budget[:, None].expand(-1, n), c.shift, c.time_schedule)
            t = torch.where(noise.clean, noise.t, t)
        return ChunkNoise(t=t.float(), clean=noise.clean)

    @torch.no_grad()
    def prepare(self, batch: dict, generator: torch.Generator, step: int) -> Microbatch:
        c, cw = self.cfg, self.chunk_width
        self._update_target(step)
        B, n = batch["latent"].shape[0], batch["latent"].shape[2] // cw
        budget = draw_budgets(B, c.budgets, c.budget_probs, generator, self.device)        # [B]
        levels = self.levels(B, n, budget, generator)
        # the student (and its half steps) sees clean context as cfg-1 serving encodes it, the teacher as its
        # guided serving does (diffusion.context_encoding)
        kwargs, _, loss_weight = prepare_inputs(batch, generator, self.flow_cfg, cw, self.device,
                                                noise_levels=levels, caption_dropout=c.caption_dropout,
                                                served_cfg_number=1)
        N = budget[:, None].expand(-1, n)
        kwargs["dt"] = budget_dt_code(N).to(self.device)
        x, t, clean = kwargs["x"], kwargs["t"], levels.clean
        context = clean & self.flow_cfg.null_caption_on_clean
        sample_dropped = kwargs["caption_dropped"][:, -1]      # the last chunk is never clean context
        teacher_dropped, teacher_null = context_flags(context, sample_dropped, c.cfg_number)

        with autocast_context(self.device, self.autocast_dtype):
            v_teacher = guided_velocity(self.teacher, x, t, kwargs["caption"], kwargs["caption_mask"],
                                        teacher_dropped, chunk_width=cw, cfg_number=c.cfg_number,
                                        t_range=c.cfg_t_range, prev_scales=c.prev_chunk_scales,
                                        text_scales=c.text_scales, caption_null=teacher_null)
            # the big step of budget N = two steps of budget 2N (code N); clean chunks do not move
            t_mid, t_next = step_times(t, N, c.shift, c.time_schedule)
            t_mid, t_next = torch.where(clean, t, t_mid), torch.where(clean, t, t_next)
            fine_code = budget_dt_code(2 * N).to(self.device)

            def finer(x_in, t_in):
                return self.target(x_in, t_in, kwargs["caption"], kwargs["caption_mask"], kwargs["caption_dropped"],
                                   fine_code, caption_null=kwargs.get("caption_null")).float()

            v_coarse = two_half_step_target(finer, x, t, t_mid, t_next, cw)
        finest = (budget == float(max(c.budgets)))[:, None, None, None, None]
        target = torch.where(finest, v_teacher, v_coarse)
        return kwargs, target.detach(), loss_weight


def build_shortcut_distill(cfg, runtime, model) -> ShortcutDistillObjective:
    """Builder of OBJECTIVES['shortcut_distill']: the teacher (and an EMA target) in the run's layout."""
    from magi_train.training.build import autocast_dtype

    d = cfg.distill
    teacher = runtime.build_frozen(dataclasses.replace(cfg.model, distill=False), d.teacher, "distill.teacher")
    extra = {}
    target = model
    if d.target_model == "ema":
        target = runtime.build_frozen(cfg.model, cfg.train.init_from, "train.init_from")
        extra = dict(student=model, student_named=list(runtime.named_parameters()),
                     target_named=list(target.magi_parallel.named_parameters()))
    return ShortcutDistillObjective(d, cfg.train.flow, cfg.model.chunk_width, runtime.env.device, teacher, target,
                                    autocast_dtype(cfg.train, runtime.env.device), **extra)


__all__ = ["ShortcutDistillObjective", "DistillLoss", "build_shortcut_distill", "draw_budgets",
           "chunk_pseudo_huber"]
