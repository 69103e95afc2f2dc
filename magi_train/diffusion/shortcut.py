"""Shortcut distillation as pure functions: step budgets, step-size codes, grid positions, two-half-step targets.

A step budget N walks a chunk through the sampler's grid in N equal steps of the base position u
(t = schedule_time(u): u^2 then shift, as magi_infer samples). A distilled model is told its step size by
dt_code = 1 / (2 * du): N / 2 for a uniform grid of N steps (MAGI-1: 64 -> 32, 8 -> 4), 4 and 8 for the 1/8 and
1/16 steps of the 12-step shortcut "8,16,16" (diffusion.sampling.distill_dt_factors, the function magi_infer
calls). Self-consistency (one step of budget N = two steps of budget 2N): the target velocity of the big step is
the one that lands where two Euler half steps land, each chunk with its own t and dt:

    x_mid  = x + v1 * (t_mid - t)          v1 = f(x, t, code(2N))
    x_next = x_mid + v2 * (t_next - t_mid) v2 = f(x_mid, t_mid, code(2N))
    target = (x_next - x) / (t_next - t) = (v1 (t_mid - t) + v2 (t_next - t_mid)) / (t_next - t)

On a uniform t axis that is the mean of v1 and v2 (the shortcut-model rule); on MAGI-1's shifted grid the
half steps have different lengths in t and are weighted by them."""
from __future__ import annotations

from typing import Callable

import torch

from .flow_matching import expand_to_frames
from .sampling import euler_step, schedule_time

__all__ = ["budget_dt_code", "base_position", "snap_to_grid", "step_times", "combine_half_steps",
           "two_half_step_target"]


def budget_dt_code(budget: torch.Tensor | int) -> torch.Tensor:
    """Step-size code of a uniform budget of N steps: 1 / (2 * (1 / N)) = N / 2 (MAGI-1's dt_code)."""
    return torch.as_tensor(budget, dtype=torch.float32) / 2.0


def base_position(t: torch.Tensor, shift: float = 3.0, schedule: str = "sd3") -> torch.Tensor:
    """Inverse of schedule_time: the base grid position u of noise level t."""
    t = t.double().clamp(0.0, 1.0)
    if schedule == "sd3":
        # shift_time(v, s) = (v / s) / (1 + (1/s - 1) v) is a Moebius map; its inverse is the same map with 1/s
        v = shift * t / (1 + (shift - 1) * t)
        return v.clamp(0.0, 1.0).sqrt().float()
    if schedule == "square":
        return t.sqrt().float()
    if schedule == "identity":
        return t.float()
    return schedule_time(t.float(), shift, schedule)   # raises the one-line error for an unknown schedule


def snap_to_grid(t: torch.Tensor, budget: torch.Tensor, shift: float = 3.0, schedule: str = "sd3") -> torch.Tensor:
    """t [B, n] -> the grid point of budget N [B, n] at or below it (a level the sampler visits at N steps).
    Never the last grid point (t = 1 is clean: no step left). Monotone in t, so chunk order is kept."""
    u = base_position(t, shift, schedule).double()
    N = budget.to(u)
    k = torch.floor(u * N + 1e-9).clamp(min=0.0)
    k = torch.minimum(k, N - 1)
    return schedule_time((k / N).float(), shift, schedule)


def step_times(t: torch.Tensor, budget: torch.Tensor, shift: float = 3.0, schedule: str = "sd3"):
    """(t_mid, t_next) [B, n]: the half step and the full step of budget N from t, along the base grid
    (u + 1/(2N), u + 1/N, clamped at 1)."""
    u = base_position(t, shift, schedule).double()
    N = budget.to(u)
    mid = schedule_time((u + 0.5 / N).clamp(max=1.0).float(), shift, schedule)
    nxt = schedule_time((u + 1.0 / N).clamp(max=1.0).float(), shift, schedule)
    return mid, nxt


def combine_half_steps(v1: torch.Tensor, v2: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                       t_next: torch.Tensor, chunk_width: int) -> torch.Tensor:
    """The one-step velocity that lands where the two half steps land (per chunk); chunks that do not move
    (t_next == t, e.g. clean context) take v1."""
    span = t_next - t
    moving = span > 0
    w1 = torch.where(moving, (t_mid - t) / torch.where(moving, span, torch.ones_like(span)), torch.ones_like(span))
    w1 = expand_to_frames(w1.float(), chunk_width).to(v1.dtype)
    return w1 * v1 + (1 - w1) * v2


def two_half_step_target(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                         t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor, chunk_width: int) -> torch.Tensor:
    """velocity(x, t) -> v (the model at the finer budget); returns the big step's target velocity (detached by
    the caller's no_grad). Each chunk steps by its own dt."""
    v1 = velocity(x, t)
    x_mid = euler_step(x, v1, t, t_mid, chunk_width)
    v2 = velocity(x_mid, t_mid)
    return combine_half_steps(v1, v2, t, t_mid, t_next, chunk_width)
