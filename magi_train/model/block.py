"""One MAGI-1 transformer layer: parallel self+cross attention, sandwich norms, gated residuals, MLP."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from magi_train.config import ModelConfig

from . import fused_ops
from .attention import caption_cross_attention, chunk_causal_attention
from .chunk_layout import ChunkLayout
from .kv_cache import KVCache
from .norms import LayerNorm1p, softcap
from .spec import LayerSpec


@dataclass
class BlockContext:
    """What every layer needs beside the hidden states; built once per forward by the DiT."""

    cond: torch.Tensor            # [B, n_chunks, cond_dim] per-chunk condition (fp32)
    token_chunk: torch.Tensor     # [S_local] index of each local token's chunk in cond
    rope_cos: torch.Tensor        # [S_local, R]
    rope_sin: torch.Tensor
    caption: torch.Tensor         # [B, n_chunks, L, xattn_dim] projected caption tokens
    caption_mask: torch.Tensor    # [B, n_chunks, L] bool
    layout: ChunkLayout
    kv_cache: KVCache | None = None
    cache_write: bool = False


def _fp32(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def _affine(norm: LayerNorm1p):
    """The (weight, bias) LayerNorm1p applies (stored weight + 1 when zero-centred, computed as it does)."""
    return (norm.weight + 1 if norm.zero_centered else norm.weight), norm.bias


def fused_column_projection(x: torch.Tensor, linears) -> list[torch.Tensor]:
    """[m(x) for m in linears] as one GEMM where the linears allow it: plain nn.Linear weights concatenated at
    run time (the parameters, and so the checkpoint names, stay separate), or a spec's own fused path (a
    classmethod fused_forward(x, linears), e.g. tensor parallel: one communication for all of them; the MAGI-1
    fp8 format: one quantisation and one GEMM). Other linears (Transformer Engine, torchao fp8) run one by one."""
    kind = type(linears[0])
    if any(type(m) is not kind for m in linears):
        return [m(x) for m in linears]
    if kind is nn.Linear and all(m.bias is None for m in linears):
        w = torch.cat([m.weight for m in linears])
        return list(F.linear(x, w).split([m.weight.shape[0] for m in linears], dim=-1))
    fused = getattr(kind, "fused_forward", None)
    if fused is not None:
        return fused(x, linears)
    return [m(x) for m in linears]


class LinearQKV(nn.Module):
    """Input LayerNorm and the four projections of the normed hidden state (names as in MAGI-1)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.q = spec.column(cfg.hidden_size, cfg.q_dim, "q")
        self.qx = spec.column(cfg.hidden_size, cfg.q_dim, "qx")
        self.k = spec.column(cfg.hidden_size, cfg.kv_dim, "k")
        self.v = spec.column(cfg.hidden_size, cfg.kv_dim, "v")

    def forward(self, x: torch.Tensor):
        """x -> (q, qx, k, v, dtype): the projections of the normed hidden state, from one GEMM where the linears
        allow it, and the normed state's dtype (MAGI-1 casts the cross-attention inputs to it)."""
        h = self.layer_norm(x)
        q, qx, k, v = fused_column_projection(h, (self.q, self.qx, self.k, self.v))
        return q, qx, k, v, h.dtype


class AttentionCore(nn.Module):
    """Self-attention over chunks (with KV cache) and cross-attention to each chunk's caption.

    Works on the full sequence of the heads it is given; context parallelism swaps this module for a wrapper
    that all-to-alls sequence and heads around it (magi_train.parallel), the model itself is unchanged."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, layer: int, q, k, v, qx, kx, vx, ctx: BlockContext) -> torch.Tensor:
        """q/k/v/qx [S, B, H, D], kx/vx [B, n, L, Hkv, D] -> [S, B, 2, H, D]: the self- and cross-attention heads
        side by side, as linear_proj reads them (flattened, a view). Both attentions write into that one buffer,
        so no output is concatenated or re-laid out."""
        S, B, H, D = q.shape
        if ctx.kv_cache is not None:
            cached = [c for c in ctx.layout.kv_chunks if c not in ctx.layout.q_chunks]
            if ctx.cache_write:
                ctx.kv_cache.write(layer, ctx.layout.q_chunks, k, v)
            if cached:  # the history and the window's own K/V in one concatenation
                k, v = ctx.kv_cache.read_before(layer, cached, k, v)
        out = q.new_empty(S, B, 2, H, D)
        chunk_causal_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), ctx.layout,
                               self.backend, out=out[:, :, 0].permute(1, 2, 0, 3))
        n = ctx.caption.shape[1]
        T = S // n
        as_chunks = lambda x: x.view(n, T, B, H, D).permute(2, 0, 3, 1, 4)  # noqa: E731  [B, n, H, T, D]
        caption_cross_attention(as_chunks(qx), kx.permute(0, 1, 3, 2, 4), vx.permute(0, 1, 3, 2, 4),
                                ctx.caption_mask, out=as_chunks(out[:, :, 1]))
        return out


class SelfCrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.head_dim = cfg.kv_channels
        self.heads = spec.local_heads(cfg.num_attention_heads, "q")
        self.kv_heads = spec.local_heads(cfg.num_query_groups, "kv")
        self.linear_qkv = LinearQKV(cfg, spec)
        # caption K/V, per KV head laid out [k(hd), v(hd)]
        self.linear_kv_xattn = spec.column(cfg.xattn_dim, 2 * cfg.kv_dim, "kv_xattn")
        # input = [self-attn heads | cross-attn heads] of this rank
        self.linear_proj = spec.row(2 * cfg.q_dim, cfg.hidden_size, "proj")
        eps, zc = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.q_layernorm = LayerNorm1p(self.head_dim, eps, zc)
        self.k_layernorm = LayerNorm1p(self.head_dim, eps, zc)
        self.q_layernorm_xattn = LayerNorm1p(self.head_dim, eps, zc)
        self.k_layernorm_xattn = LayerNorm1p(self.head_dim, eps, zc)
        self.core = AttentionCore(cfg.attention_backend)

    def _heads(self, x, heads):
        return x.reshape(*x.shape[:-1], heads, self.head_dim)

    def _norm_rope(self, x, norm, ctx: BlockContext | None, out_dtype=None):
        # fp32 norm (+ RoPE when ctx is given), cast to out_dtype (x's by default): one fused island (fused_ops.py)
        with _fp32(x.device.type):
            return fused_ops.norm_rope(x, *_affine(norm), norm.eps, None if ctx is None else ctx.rope_cos,
                                       None if ctx is None else ctx.rope_sin, out_dtype)

    def forward(self, x: torch.Tensor, ctx: BlockContext, layer: int) -> torch.Tensor:
        q, qx, k, v, dtype = self.linear_qkv(x)
        q = self._norm_rope(self._heads(q, self.heads), self.q_layernorm, ctx)
        k = self._norm_rope(self._heads(k, self.kv_heads), self.k_layernorm, ctx)
        v = self._heads(v, self.kv_heads)
        qx = self._norm_rope(self._heads(qx, self.heads), self.q_layernorm_xattn, None, dtype)
        kvx = self.linear_kv_xattn(ctx.caption.to(dtype))
        kvx = kvx.reshape(*kvx.shape[:-1], self.kv_heads, 2 * self.head_dim)
        kx, vx = kvx[..., :self.head_dim], kvx[..., self.head_dim:]
        kx = self._norm_rope(kx, self.k_layernorm_xattn, None, dtype)
        return self.linear_proj(self.core(layer, q, k, v, qx, kx, vx, ctx).flatten(-3))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.gated = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        # SwiGLU: fc1 output is [gate | up] (halves), as MAGI-1 stores it
        self.linear_fc1 = spec.column(cfg.hidden_size, cfg.ffn_hidden_size * (2 if self.gated else 1), "fc1")
        self.linear_fc2 = spec.row(cfg.ffn_hidden_size, cfg.hidden_size, "fc2")

    def forward(self, x, normed=None):
        """normed: layer_norm(x) when the gated residual before already computed it (fused_ops.gated_residual)."""
        h = self.linear_fc1(self.layer_norm(x) if normed is None else normed)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


class AdaModulate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(cfg.cond_dim, int(cfg.hidden_size * cfg.cond_gating_ratio) * 2))

    def forward(self, cond):
        return softcap(self.proj(F.silu(cond)), 1.0)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec, layer_number: int):
        super().__init__()
        self.layer_number = layer_number  # global index: names the layer's KV-cache slot
        self.ada_modulate_layer = AdaModulate(cfg)
        self.self_attention = SelfCrossAttention(cfg, spec)
        eps, zc = cfg.layernorm_epsilon, cfg.apply_layernorm_1p
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, eps, zc)
        self.mlp = MLP(cfg, spec)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, eps, zc)
        # Set from outside (magi_train.parallel.recompute): fn(compute, x, ctx) runs the layer under activation
        # checkpointing. None: the plain forward (inference, no recompute).
        self.recompute = None

    def _gated_residual(self, x, residual, gate, token_chunk, norm, next_norm=None):
        # residual + post_norm(gate * x), in fp32 as MAGI-1 does: one fused island (model/fused_ops.py), which
        # may also return next_norm(result) (else None). The gate goes per chunk: the one-pass CUDA kernel reads
        # it so; the Inductor island gets it gathered per token (an indexed load inside it made it 1.65x slower
        # on the H200, docs/benchmarks.md, issue 19)
        with _fp32(x.device.type):
            nxt = None if next_norm is None else (next_norm.weight, next_norm.bias, next_norm.eps)
            return fused_ops.gated_residual(x, residual, gate, token_chunk, *_affine(norm), norm.eps, nxt)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if self.recompute is not None:
            return self.recompute(self.compute, x, ctx)
        return self.compute(x, ctx)

    def compute(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        gates = self.ada_modulate_layer(ctx.cond.to(x.dtype))      # [B, n, 2D], in the blocks' dtype
        g_msa, g_mlp = gates.chunk(2, dim=-1)                      # [B, n, D] each, per chunk
        x, normed = self._gated_residual(self.self_attention(x, ctx, self.layer_number), x, g_msa, ctx.token_chunk,
                                         self.self_attn_post_norm, self.mlp.layer_norm)
        x, _ = self._gated_residual(self.mlp(x, normed), x, g_mlp, ctx.token_chunk, self.mlp_post_norm)
        return x
