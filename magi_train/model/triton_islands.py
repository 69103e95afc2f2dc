"""Two fp32 islands of a layer as hand-written Triton kernels, one program a row, for CUDA inference.

fused_ops picks them when the compiled islands are on and the inputs are CUDA tensors without autograd; the
Inductor islands remain for everything else. Why by hand (H200, 4.5B at 480p, docs/benchmarks.md issue 19):

- gated residual: Inductor runs it as a looped two-pass reduction over the 3072 columns (its one-pass heuristic
  stops at 1024, multi_kernel included), 1.3 TB/s at batch 2. A row of up to 8192 columns fits in registers, so
  this kernel reads x, the residual and the chunk's gate once and writes the new residual once. It reads the
  gate per chunk ([B, n, D], L2-resident) instead of a per-token gathered copy, and can emit the MLP's input
  LayerNorm of the new residual from the same registers, saving that kernel's read of the row.
- head norm + RoPE: Inductor splits it into a norm kernel and a RoPE kernel (the rotation pairs columns R apart,
  after the reduction). Here a program normalises all heads of a token and rotates them in one pass.

The widths (hidden, heads, head_dim, rotary half) are compile-time constants: a model has a few, and the masks
then cost nothing. Arithmetic as the eager islands: fp32 products, norms, rotations and sums, one cast at the end;
the second norm of the gated residual is taken of the cast value, as nn.LayerNorm would take it. Forward only (no
autograd)."""
from __future__ import annotations

import functools

import torch

MAX_COLUMNS = 8192


@functools.lru_cache(maxsize=None)
def available() -> bool:
    # asked on every island call (three a layer-forward): the import is tried once
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    warps = [triton.Config({}, num_warps=w) for w in (4, 8, 16)]

    @triton.autotune(configs=warps, key=["D", "NORM2"])
    @triton.jit
    def gated_residual_rows(X, R, G, TC, W, Bw, Y, W2, B2, Y2, batch, D: tl.constexpr,
                            sx_s, sx_b, sr_s, sr_b, sg_b, sg_n, sy_s, sy_b, sy2_s, sy2_b, eps, eps2,
                            BLOCK: tl.constexpr, NORM2: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s = row // batch
        b = row % batch
        cols = tl.arange(0, BLOCK)
        m = cols < D
        chunk = tl.load(TC + s).to(tl.int64)
        x = tl.load(X + s * sx_s + b * sx_b + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + b * sg_b + chunk * sg_n + cols, mask=m, other=0.0).to(tl.float32)
        h = x * g
        mean = tl.sum(h, axis=0) / D
        d = tl.where(m, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / D + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        bias = tl.load(Bw + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.load(R + s * sr_s + b * sr_b + cols, mask=m, other=0.0).to(tl.float32)
        y = (r + d * rstd * w + bias).to(Y.dtype.element_ty)
        tl.store(Y + s * sy_s + b * sy_b + cols, y, mask=m)
        if NORM2:
            yf = tl.where(m, y.to(tl.float32), 0.0)
            mean2 = tl.sum(yf, axis=0) / D
            d2 = tl.where(m, yf - mean2, 0.0)
            rstd2 = tl.rsqrt(tl.sum(d2 * d2, axis=0) / D + eps2)
            w2 = tl.load(W2 + cols, mask=m, other=0.0).to(tl.float32)
            b2 = tl.load(B2 + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(Y2 + s * sy2_s + b * sy2_b + cols, (d2 * rstd2 * w2 + b2).to(Y2.dtype.element_ty), mask=m)

    @triton.autotune(configs=warps[:2], key=["H", "D", "ROPE"])
    @triton.jit
    def norm_rope_rows(X, W, Bw, COS, SIN, Y, per_cos, H: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                       sx_r, sx_h, sy_r, sy_h, sc, eps, HB: tl.constexpr, DB: tl.constexpr, ROPE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HB)[:, None]
        c = tl.arange(0, DB)[None, :]
        m = (h < H) & (c < D)
        base = X + row * sx_r + h * sx_h
        x = tl.load(base + c, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=1) / D + eps)
        w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
        bias = tl.load(Bw + c, mask=c < D, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w + bias
        if ROPE:  # NeoX halves on the first 2 * RD columns: (y1, y2) -> (y1 cos - y2 sin, y1 sin + y2 cos)
            first = c < RD
            rot = c < 2 * RD
            p = tl.where(first, c + RD, tl.where(rot, c - RD, c))
            xp = tl.load(base + p, mask=m, other=0.0).to(tl.float32)
            wp = tl.load(W + p, mask=p < D, other=0.0).to(tl.float32)
            bp = tl.load(Bw + p, mask=p < D, other=0.0).to(tl.float32)
            yp = (xp - mean[:, None]) * rstd[:, None] * wp + bp
            a = tl.where(first, c, c - RD)
            token = row // per_cos
            cs = tl.load(COS + token * sc + a, mask=rot, other=1.0)
            sn = tl.load(SIN + token * sc + a, mask=rot, other=0.0)
            y = tl.where(rot, y * cs + tl.where(first, -1.0, 1.0) * yp * sn, y)
        tl.store(Y + row * sy_r + h * sy_h + c, y.to(Y.dtype.element_ty), mask=m)

    return triton, gated_residual_rows, norm_rope_rows


def _no_grad(tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def supports_gated_residual(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs: CUDA, [S, B, D] rows with unit column stride, D <= MAX_COLUMNS,
    no autograd (the kernel has no backward), and Triton importable."""
    tensors = (x, residual, gate)
    return (all(t.is_cuda and t.stride(-1) == 1 for t in tensors) and x.dim() == 3 and gate.dim() == 3
            and x.shape[-1] <= MAX_COLUMNS and _no_grad(tensors) and available())


def gated_residual(x, residual, gate, token_chunk, weight, bias, eps: float, next_norm=None):
    """residual + LayerNorm(gate[:, token_chunk] * x) for x/residual [S, B, D] and a per-chunk gate [B, n, D];
    with next_norm = (weight, bias, eps) also that LayerNorm of the result. Returns (y, normed or None)."""
    triton, kernel, _ = _kernels()
    S, B, D = x.shape
    y = torch.empty(S, B, D, dtype=residual.dtype, device=x.device)
    y2 = torch.empty_like(y) if next_norm is not None else y
    w2, b2, eps2 = next_norm if next_norm is not None else (weight, bias, eps)
    kernel[(S * B,)](x, residual, gate, token_chunk, weight, bias, y, w2, b2, y2, B, D,
                     x.stride(0), x.stride(1), residual.stride(0), residual.stride(1), gate.stride(0),
                     gate.stride(1), y.stride(0), y.stride(1), y2.stride(0), y2.stride(1), float(eps), float(eps2),
                     BLOCK=triton.next_power_of_2(D), NORM2=next_norm is not None)
    return y, (y2 if next_norm is not None else None)


def _rows(x: torch.Tensor):
    """x [..., heads, head_dim] as a [rows, heads, head_dim] view, or None when its leading dims do not merge."""
    try:
        return x.view(-1, *x.shape[-2:])
    except RuntimeError:
        return None


def supports_norm_rope(x: torch.Tensor) -> bool:
    """[..., heads, head_dim] CUDA heads with unit column stride whose leading dims merge into rows, no autograd."""
    return (x.is_cuda and x.dim() >= 3 and x.stride(-1) == 1 and x.shape[-1] <= 256 and x.shape[-2] <= 64
            and _no_grad((x,)) and _rows(x) is not None and available())


def norm_rope(x, weight, bias, eps: float, cos=None, sin=None, out_dtype: torch.dtype | None = None):
    """LayerNorm over each head of x [..., heads, head_dim] (fp32), then, with cos/sin [S, RD] (x [S, B, ...]),
    RoPE on the first 2 RD columns of every head; cast to out_dtype (x's by default)."""
    triton, _, kernel = _kernels()
    rows = _rows(x)
    N, H, D = rows.shape
    y = torch.empty(N, H, D, dtype=out_dtype or x.dtype, device=x.device)
    rope = cos is not None
    if rope:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        per_cos, rd = N // cos.shape[0], cos.shape[-1]
    else:
        cos = sin = y  # unused
        per_cos, rd = 1, 0
    kernel[(N,)](rows, weight, bias, cos, sin, y, per_cos, H, D, rd, rows.stride(0), rows.stride(1),
                 y.stride(0), y.stride(1), cos.stride(0) if rope else 0, float(eps),
                 HB=triton.next_power_of_2(H), DB=triton.next_power_of_2(D), ROPE=rope)
    return y.view(x.shape)
