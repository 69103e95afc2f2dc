"""DistillConfig (distill.* keys): shortcut + CFG distillation, train.objective=shortcut_distill.

The MAGI-1 release publishes neither the loss, the budget probabilities nor the hyper-parameters of its
distillation; each choice here is a field, with the reason for its default in docs/distill.md."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from magi_train.errors import ConfigError, check, check_choice

TARGET_MODELS = ("student", "ema")
LOSSES = ("mse", "pseudo_huber")
CFG_NUMBERS = (1, 2, 3)
TIME_SCHEDULES = ("sd3", "square", "identity")   # diffusion.sampling.TIME_SCHEDULES (config stays torch-free)


@dataclass
class DistillConfig:
    teacher: Optional[str] = None         # MAGI-1 checkpoint of the frozen teacher (a base model: {load} or
                                          # .../inference_weight, or one of our exports)
    budgets: list[int] = field(default_factory=lambda: [64, 32, 16, 8])   # step budgets, finest first, each half
                                          # the one before; the finest learns the teacher, the others the student
    budget_probs: list[float] = field(default_factory=lambda: [0.4, 0.2, 0.2, 0.2])   # per sample, one per budget
    target_model: str = "student"         # who takes the two half steps of a coarser budget's target: the student
                                          # itself (stop-gradient) or an EMA copy of it
    target_ema_decay: float = 0.99        # target_model=ema: per optimizer step
    loss: str = "mse"                     # mse | pseudo_huber (per element sqrt(e^2 + c^2) - c)
    huber_c: float = 0.03                 # pseudo_huber: c
    snap_t: bool = True                   # move each chunk's t to a grid point of its budget (where the sampler
                                          # evaluates the student); false keeps the drawn t
    caption_dropout: float = 0.0          # the student is served with its prompt (cfg 1): no dropout by default
    cfg_number: int = 3                   # teacher guidance: 3 MAGI-1 (text + context + uncond), 2 text-only, 1 none
    cfg_t_range: list[float] = field(default_factory=lambda: [0.0, 0.0217, 0.1, 0.3, 0.999])   # MAGI-1 t bins
    prev_chunk_scales: list[float] = field(default_factory=lambda: [1.5, 1.5, 1.5, 1.0, 1.0])
    text_scales: list[float] = field(default_factory=lambda: [7.5, 7.5, 7.5, 0.0, 0.0])
    shift: float = 3.0                    # the sampler's grid (magi_infer shift and time_schedule) budgets walk
    time_schedule: str = "sd3"

    def __post_init__(self) -> None:
        p = "distill"
        b = self.budgets
        check(len(b) >= 1 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in b),
              f"{p}.budgets", f"must be a non-empty list of positive integers, got {b!r}")
        check(all(b[i] == 2 * b[i + 1] for i in range(len(b) - 1)), f"{p}.budgets",
              f"must go from the finest down, each half the one before (e.g. [64, 32, 16, 8]), got {b!r}")
        probs = self.budget_probs
        check(len(probs) == len(b), f"{p}.budget_probs", f"needs one probability per budget ({len(b)}), got {probs!r}")
        check(all(v >= 0 for v in probs) and abs(sum(probs) - 1.0) < 1e-6, f"{p}.budget_probs",
              f"must be non-negative and add up to 1, got {probs!r}")
        check_choice(self.target_model, f"{p}.target_model", TARGET_MODELS)
        check(0.0 <= self.target_ema_decay < 1.0, f"{p}.target_ema_decay",
              f"must be in [0, 1), got {self.target_ema_decay}")
        check_choice(self.loss, f"{p}.loss", LOSSES)
        check(self.huber_c > 0, f"{p}.huber_c", f"must be > 0, got {self.huber_c}")
        check(0.0 <= self.caption_dropout <= 1.0, f"{p}.caption_dropout",
              f"must be in [0, 1], got {self.caption_dropout}")
        check_choice(self.cfg_number, f"{p}.cfg_number", CFG_NUMBERS)
        n = len(self.cfg_t_range)
        check(n >= 1 and list(self.cfg_t_range) == sorted(self.cfg_t_range) and self.cfg_t_range[0] <= 0.0,
              f"{p}.cfg_t_range", f"must be increasing edges starting at 0, got {self.cfg_t_range!r}")
        for name in ("prev_chunk_scales", "text_scales"):
            check(len(getattr(self, name)) == n, f"{p}.{name}",
                  f"needs one scale per cfg_t_range bin ({n}), got {getattr(self, name)!r}")
        check(self.shift >= 1.0, f"{p}.shift", f"must be >= 1, got {self.shift}")
        check_choice(self.time_schedule, f"{p}.time_schedule", TIME_SCHEDULES)


def validate_distill(cfg) -> None:
    """Cross-field checks of train.objective=shortcut_distill (cfg: MagiConfig); one line naming the field."""
    if cfg.train.objective != "shortcut_distill":
        return
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher: train.objective=shortcut_distill needs the teacher's MAGI-1 checkpoint")
    check(cfg.model.distill, "model.distill",
          "train.objective=shortcut_distill trains a step-size conditioned student: set model.distill=true")
    check(bool(cfg.train.init_from), "train.init_from",
          "train.objective=shortcut_distill starts the student from a checkpoint (usually distill.teacher's)")
    check(cfg.train.validation.every_steps == 0, "train.validation.every_steps",
          "the held-out loss is the flow-matching loss of a base model; set 0 for train.objective=shortcut_distill "
          f"(judge a student with scripts/eval_distill.py), got {cfg.train.validation.every_steps}")


__all__ = ["DistillConfig", "validate_distill", "TARGET_MODELS", "LOSSES"]
