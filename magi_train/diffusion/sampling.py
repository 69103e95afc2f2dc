"""Sampling schedules shared by inference and training-time validation: pure functions, no model.

Convention (MAGI-1): x_t = t * x1 + (1 - t) * noise, t = 1 clean, v = x1 - noise, Euler x += v * dt.
- time_grid: t = base grid (uniform, or a shortcut pattern for distilled models) -> t^2 -> shift (SD3 form
  written for t = 1 clean: t' = (t / s) / (1 + (1/s - 1) t)).
- Shortcut patterns such as "8,16,16" give the step sizes of one repeating group in units of 1/denominator
  (1/8, 1/16, 1/16: four groups make 12 steps). MAGI-1 uses them when num_steps equals the pattern's step count.
- Distilled models are conditioned on the step size: dt_factor = 1 / (2 * base step), MAGI-1's numbers.
- CFG (MAGI-1): v = (1 - s_prev) u + (s_prev - s_text) c + s_text ct, scales chosen per chunk by a t bin.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch

__all__ = [
    "TIME_SCHEDULES", "parse_shortcut_mode", "shortcut_applies", "base_time_grid", "shift_time", "time_grid",
    "schedule_time",
    "distill_dt_factors", "euler_step", "cfg_bins", "cfg_scales", "combine_cfg", "blend_prev_chunks",
]

TIME_SCHEDULES = ("sd3", "square", "identity")


def parse_shortcut_mode(mode: str) -> tuple[int, ...]:
    """'8,16,16' -> (8, 16, 16); '' -> (). The step sizes 1/a of one group must add up to 1/k for an integer k."""
    if not mode:
        return ()
    try:
        parts = tuple(int(p) for p in str(mode).split(","))
    except ValueError:
        raise ValueError(f"shortcut_mode: expected comma-separated positive integers like '8,16,16', got {mode!r}")
    if any(p <= 0 for p in parts):
        raise ValueError(f"shortcut_mode: expected comma-separated positive integers like '8,16,16', got {mode!r}")
    group = sum(Fraction(1, p) for p in parts)
    if group.numerator != 1:
        raise ValueError(f"shortcut_mode: the steps 1/a of {mode!r} add up to {group}, which does not divide [0, 1] "
                         f"into whole groups")
    return parts


def _shortcut_steps(parts: tuple[int, ...]) -> int:
    return len(parts) * sum(Fraction(1, p) for p in parts).denominator


def shortcut_applies(num_steps: int, shortcut_mode: str) -> bool:
    """MAGI-1 applies a shortcut pattern only when num_steps equals its step count (12 for '8,16,16')."""
    parts = parse_shortcut_mode(shortcut_mode)
    return bool(parts) and num_steps == _shortcut_steps(parts)


def base_time_grid(num_steps: int, shortcut_mode: str = "", device=None) -> torch.Tensor:
    """[num_steps + 1] grid on [0, 1] before the t^2 / shift transform (float32, as MAGI-1 computes it)."""
    if num_steps <= 0:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps}")
    if shortcut_applies(num_steps, shortcut_mode):
        parts = parse_shortcut_mode(shortcut_mode)
        sizes = [Fraction(1, p) for p in parts] * (num_steps // len(parts))
        acc, points = Fraction(0), [0.0]
        for s in sizes:
            acc += s
            points.append(float(acc))
        return torch.tensor(points, dtype=torch.float32, device=device)
    return torch.linspace(0, 1, num_steps + 1, device=device)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift for the t = 1 clean convention: spends more steps near noise when shift > 1."""
    if shift < 1.0:
        raise ValueError(f"shift: must be >= 1, got {shift}")
    inv = 1.0 / shift
    return inv * t / (1 + (inv - 1) * t)


def time_grid(num_steps: int, shift: float = 3.0, schedule: str = "sd3", shortcut_mode: str = "",
              device=None) -> torch.Tensor:
    """Noise levels t_0 = 0 < ... < t_N = 1 a chunk walks through (MAGI-1: square, then shift 3)."""
    return schedule_time(base_time_grid(num_steps, shortcut_mode, device), shift, schedule)


def schedule_time(u: torch.Tensor, shift: float = 3.0, schedule: str = "sd3") -> torch.Tensor:
    """Base grid position u in [0, 1] -> noise level t (the transform of time_grid, for any u)."""
    if schedule == "sd3":
        return shift_time(u ** 2, shift)
    if schedule == "square":
        return u ** 2
    if schedule == "identity":
        return u
    raise ValueError(f"time_schedule: got {schedule!r}, accepted values are {', '.join(TIME_SCHEDULES)}")


def distill_dt_factors(num_steps: int, shortcut_mode: str = "") -> torch.Tensor:
    """[num_steps] value a distilled model's step-size embedding receives at each step: 1 / (2 * base step).
    (MAGI-1: num_steps / 2 for uniform grids; 4 for a 1/8 and 8 for a 1/16 shortcut step.)"""
    base = base_time_grid(num_steps, shortcut_mode).double()
    return (1.0 / (2.0 * (base[1:] - base[:-1]))).float()


def _per_chunk(values: torch.Tensor, like: torch.Tensor, chunk_width: int) -> torch.Tensor:
    """[n] or [B, n] per-chunk values -> broadcastable to like [B, C, n*cw, H, W]."""
    values = values.to(like.device, like.dtype)
    if values.dim() == 1:
        values = values[None]
    return values.repeat_interleave(chunk_width, dim=1)[:, None, :, None, None]


def euler_step(x: torch.Tensor, v: torch.Tensor, t_now: torch.Tensor, t_next: torch.Tensor,
               chunk_width: int) -> torch.Tensor:
    """x, v [B, C, n*chunk_width, H, W]; t_now, t_next [n] or [B, n]: each chunk moves by its own dt."""
    if x.shape[2] != t_now.shape[-1] * chunk_width:
        raise ValueError(f"euler_step: {x.shape[2]} latent frames do not hold {t_now.shape[-1]} chunks of {chunk_width}")
    return x + v * _per_chunk(t_next - t_now, x, chunk_width)


def cfg_bins(t: torch.Tensor, t_range: Sequence[float]) -> torch.Tensor:
    """Index of the CFG bin of each t: the last edge <= t (edges compared with MAGI-1's 1e-7 slack)."""
    edges = torch.as_tensor(t_range, dtype=torch.float32, device=t.device)
    idx = torch.searchsorted(edges - 1e-7, t.float().contiguous()) - 1
    if bool((idx < 0).any()):
        raise ValueError(f"cfg_t_range: first edge {t_range[0]} lies above t={float(t.min())}")
    return idx


def cfg_scales(t: torch.Tensor, t_range: Sequence[float], prev_scales: Sequence[float],
               text_scales: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk (s_prev, s_text) for noise levels t (any shape)."""
    if not (len(t_range) == len(prev_scales) == len(text_scales)):
        raise ValueError(f"cfg_t_range, prev_chunk_scales and text_scales need the same length, got "
                         f"{len(t_range)}, {len(prev_scales)}, {len(text_scales)}")
    idx = cfg_bins(t, t_range)
    prev = torch.as_tensor(prev_scales, dtype=torch.float32, device=t.device)[idx]
    text = torch.as_tensor(text_scales, dtype=torch.float32, device=t.device)[idx]
    return prev, text


def combine_cfg(v_text: torch.Tensor, v_context: torch.Tensor, v_uncond: torch.Tensor | None,
                s_prev: torch.Tensor, s_text: torch.Tensor, chunk_width: int) -> torch.Tensor:
    """MAGI-1's guidance per chunk. v_text: with previous chunks and the prompt; v_context: previous chunks and
    the null prompt; v_uncond: the chunk alone with the null prompt (None = text-only CFG, s_prev taken as 1).
    s_prev, s_text: [n] or [B, n]."""
    st = _per_chunk(s_text, v_text, chunk_width)
    if v_uncond is None:
        return v_context + st * (v_text - v_context)
    sp = _per_chunk(s_prev, v_text, chunk_width)
    return (1 - sp) * v_uncond + (sp - st) * v_context + st * v_text


def blend_prev_chunks(v_with_prev: torch.Tensor, v_alone: torch.Tensor, scale: float) -> torch.Tensor:
    """Distilled models' extra guidance for a nearly clean chunk: scale * with-history + (1 - scale) * alone."""
    return v_with_prev * scale + v_alone * (1 - scale)
