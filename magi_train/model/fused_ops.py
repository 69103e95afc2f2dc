"""The fp32 elementwise islands of a transformer layer as pure functions: eager by default, compiled on request
(Inductor; on CUDA without autograd the hand-written Triton kernels of triton_islands.py where they apply).

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

from . import triton_islands
from .rope import apply_rope

_state = {"compiled": False}


def use_compiled(enabled: bool = True) -> None:
    """Run the islands as torch.compile'd kernels (True) or as plain tensor ops (False, the default)."""
    _state["compiled"] = bool(enabled)
    if enabled:  # each island sees a handful of stride/batch variants (B = 1 or more, views of different bases)
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))


def compiled_enabled() -> bool:
    return _state["compiled"]


def _norm(x, weight, bias, eps: float, out_dtype: torch.dtype):
    """LayerNorm over the last dim in fp32 (weight/bias already effective), cast to out_dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(out_dtype)


def _norm_rope(x, weight, bias, eps: float, cos, sin, out_dtype: torch.dtype):
    """_norm, then RoPE on x [S, B, heads, head_dim] with cos/sin [S, R]."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return apply_rope(y, cos, sin).to(out_dtype)


def _gated_residual(x, residual, gate, weight, bias, eps: float):
    """residual + LayerNorm(gate * x), in fp32, cast back to the residual's dtype (MAGI-1's post norms)."""
    h = x.float() * gate
    return (residual.float() + F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)).to(residual.dtype)


def _dequantize_into(dst, x8, descale):
    """dst = x8 * descale in dst's dtype, dst any strided view (the fp8 attention's O into linear_proj's buffer)."""
    dst.copy_((x8.float() * descale.reshape(())).to(dst.dtype))


_EAGER = {"norm": _norm, "norm_rope": _norm_rope, "gated_residual": _gated_residual,
          "dequantize_into": _dequantize_into}

# Inductor options per island. The norms reduce over 128 (heads) or 3072 (hidden) columns; Inductor's heuristic
# takes a one-pass (persistent) reduction only up to 1024 columns of a plainly laid out row, and up to 64 for the
# strided views of the q/qx/k GEMM output, so every norm ran as a looped two-pass kernel (the gated residual at
# about 1.3 TB/s, the q/qx/k norms at about 1 TB/s on the H200, docs/benchmarks.md issue 19). multi_kernel also
# generates the persistent kernel and keeps whichever runs faster on the first call.
ISLAND_OPTIONS: dict[str, dict] = {name: {"triton.multi_kernel": 1} for name in ("norm", "norm_rope", "gated_residual")}


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    # dynamic=False with the token and batch dims marked dynamic (mark_rows): one kernel for every window length,
    # with the feature sizes (hidden, heads, head_dim) fixed, so the norm reduces over a known width. Measured on
    # the 4.5B model (H200, docs/benchmarks.md issue 19): the islands took 194 ms a steady chunk against 238 with
    # every dim dynamic.
    return torch.compile(_EAGER[name], dynamic=False, options=ISLAND_OPTIONS.get(name) or None)


def mark_rows(*tensors, dims: int = 2) -> None:
    """Mark the first `dims` dims (tokens, batch) of each tensor dynamic for the compiled islands; a dim of size 1
    stays specialised (maybe_mark_dynamic does not insist)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for d in range(min(dims, t.dim() - 1)):
                torch._dynamo.maybe_mark_dynamic(t, d)


def _fn(name: str):
    return _compiled(name) if _state["compiled"] else _EAGER[name]


def norm_rope(x, weight, bias, eps: float, cos=None, sin=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 LayerNorm of x's last dim, then RoPE when cos/sin are given (x [S, B, heads, head_dim])."""
    out_dtype = out_dtype or x.dtype
    if _state["compiled"] and triton_islands.supports_norm_rope(x):  # one pass, RoPE included (triton_islands.py)
        return triton_islands.norm_rope(x, weight, bias, eps, cos, sin, out_dtype)
    if cos is None:  # any leading shape: flattened to rows of heads, so one compiled kernel serves every caller
        # (the leading dims merge without a copy; merging the heads too would copy qx, a view of the q/qx/k/v GEMM)
        rows = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x
        if _state["compiled"]:
            mark_rows(rows, dims=1)
        return _fn("norm")(rows, weight, bias, eps, out_dtype).reshape(x.shape)
    if _state["compiled"]:
        mark_rows(x)
        mark_rows(cos, sin, dims=1)
    return _fn("norm_rope")(x, weight, bias, eps, cos, sin, out_dtype)


def dequantize_into(dst: torch.Tensor, x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """dst = x8 * descale (fp32 arithmetic, cast to dst's dtype), written into dst (any strides) in one pass."""
    if _state["compiled"]:
        mark_rows(dst, x8, dims=dst.dim() - 1)
    _fn("dequantize_into")(dst, x8, descale)
    return dst


def gated_residual(x, residual, gate, token_chunk, weight, bias, eps: float, next_norm=None):
    """residual + LayerNorm(gate * x) over the last dim: x/residual [S, B, D], gate per chunk [B, n, D] (a view)
    with token_chunk [S] each token's chunk. Returns (y, normed): normed is next_norm = (weight, bias, eps)
    applied to y when the one-pass CUDA kernel (model/triton_islands.py, compiled islands only) did it from its
    registers, else None and the caller normalises y itself."""
    if _state["compiled"] and triton_islands.supports_gated_residual(x, residual, gate):
        return triton_islands.gated_residual(x, residual, gate, token_chunk, weight, bias, eps, next_norm)
    gate = gate[:, token_chunk].transpose(0, 1)  # [S, B, D]
    if _state["compiled"]:
        mark_rows(x, residual, gate)
    return _fn("gated_residual")(x, residual, gate, weight, bias, eps), None
