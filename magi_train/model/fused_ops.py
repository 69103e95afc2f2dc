"""The fp32 elementwise islands of a transformer layer as pure functions: eager by default, compiled on request.

MAGI-1 keeps the q/k norms, RoPE and the gated residuals in fp32. Eager, each island is a chain of 4-8 kernels
over an fp32 copy of a [tokens, hidden] tensor (about 0.3 ms a pass for a 480p window of 47k tokens, some 10 ms a
layer); compiled, each is one kernel that reads its bf16 inputs once and writes the result once. The arithmetic is
the same (fp32 norms and rotations, one cast at the end), so the two agree to bf16 round-off.

`use_compiled(True)` switches every layer of the process (magi_infer's `compile` option); training leaves it off
and compiles whole blocks instead (train.compile)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .rope import apply_rope

_state = {"compiled": False}


def use_compiled(enabled: bool = True) -> None:
    """Run the islands as torch.compile'd kernels (True) or as plain tensor ops (False, the default)."""
    _state["compiled"] = bool(enabled)


def compiled_enabled() -> bool:
    return _state["compiled"]


def _norm_rope(x, weight, bias, eps: float, cos, sin, out_dtype: torch.dtype):
    """LayerNorm over the last dim in fp32 (weight/bias already effective), then RoPE when cos is given."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    if cos is not None:
        y = apply_rope(y, cos, sin)
    return y.to(out_dtype)


def _gated_residual(x, residual, gate, weight, bias, eps: float):
    """residual + LayerNorm(gate * x), in fp32, cast back to the residual's dtype (MAGI-1's post norms)."""
    h = x.float() * gate
    return (residual.float() + F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)).to(residual.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    # dynamic=True: one kernel for every window length (the window grows and drains; shapes repeat in between)
    return torch.compile({"norm_rope": _norm_rope, "gated_residual": _gated_residual}[name], dynamic=True)


def norm_rope(x, weight, bias, eps: float, cos=None, sin=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    fn = _compiled("norm_rope") if _state["compiled"] else _norm_rope
    return fn(x, weight, bias, eps, cos, sin, out_dtype or x.dtype)


def gated_residual(x, residual, gate, weight, bias, eps: float) -> torch.Tensor:
    fn = _compiled("gated_residual") if _state["compiled"] else _gated_residual
    return fn(x, residual, gate, weight, bias, eps)
