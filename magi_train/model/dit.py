"""The MAGI-1 DiT: one definition for training (all chunks at once) and inference (a window + KV cache).

Inputs: latent video x [B, C, T, H, W] holding whole chunks (T = n * chunk_width), one t per chunk
(t in [0,1], 1 = clean), caption embeddings per chunk (or one caption broadcast to all chunks). Output: the
velocity toward clean data, shaped like x. Parameter names equal MAGI-1's checkpoint names."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from magi_train.config import ModelConfig
from magi_train.dtypes import DTYPES

from .block import BlockContext, TransformerLayer
from .chunk_layout import ChunkLayout
from .embed import CaptionEmbedder, TimestepEmbedder
from .kv_cache import KVCache
from .norms import LayerNorm1p
from .rope import LearnableRope3D
from .spec import LayerSpec, LocalSpec


class TransformerBlocks(nn.Module):
    """videodit_blocks: the layer stack and the final norm (names as in MAGI-1)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg, spec, i) for i in range(cfg.num_layers)])
        self.final_layernorm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_epsilon, cfg.apply_layernorm_1p)


class FinalLinear(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        out = cfg.patch_size * cfg.patch_size * cfg.t_patch_size * cfg.out_channels
        self.linear = nn.Linear(cfg.hidden_size, out, bias=False)


class MagiDiT(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec | None = None):
        super().__init__()
        self.cfg = cfg
        spec = spec or LocalSpec()
        p, tp = cfg.patch_size, cfg.t_patch_size
        self.x_embedder = nn.Conv3d(cfg.in_channels, cfg.hidden_size, (tp, p, p), (tp, p, p), bias=False)
        self.t_embedder = TimestepEmbedder(cfg.cond_dim)
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, cfg.xattn_dim, cfg.cond_dim, cfg.caption_max_length)
        self.rope = LearnableRope3D(cfg.kv_channels, cfg.rope_reference_tokens)
        self.videodit_blocks = TransformerBlocks(cfg, spec)
        self.final_linear = FinalLinear(cfg)
        # Set from outside by magi_train.parallel for context parallelism: shards tokens after embedding and
        # gathers them before the final layer. None = one process holds the whole sequence.
        self.context_parallel = None
        # Set from outside by inference (MAGI-1's NEG_PROMPT): caption-space tokens [k, C] put in front of the
        # learned null caption wherever it stands in (null-prompt passes, clean chunks). None: the null caption alone.
        self.null_caption_prefix: torch.Tensor | None = None

    # ------------------------------------------------------------------ inputs
    def _captions(self, caption, caption_mask, dropped, n):
        if caption.dim() == 3:
            caption = caption[:, None].expand(-1, n, -1, -1)
        if caption_mask is None:
            caption_mask = torch.ones(caption.shape[:3], dtype=torch.bool, device=caption.device)
        elif caption_mask.dim() == 2:
            caption_mask = caption_mask[:, None].expand(-1, n, -1)
        if caption.shape[1] != n or caption_mask.shape[:3] != caption.shape[:3]:
            raise ValueError(f"caption: expected [B, {n}, L, C] with a matching mask, got {tuple(caption.shape)} "
                             f"and mask {tuple(caption_mask.shape)}")
        caption_mask = caption_mask.bool()
        if dropped is not None:  # no `dropped.any()` test: it would wait for the GPU at every forward
            L = caption.shape[2]
            null = self._null_embedding(L).to(caption.dtype)
            if null.shape[0] < L:  # captions longer than the learned null caption: zeros after it
                null = torch.cat([null, null.new_zeros(L - null.shape[0], null.shape[1])])
            null_mask = torch.arange(L, device=caption.device) < self.cfg.null_caption_tokens
            d = dropped[:, :, None]  # [B, n, 1]
            caption = torch.where(d[..., None], null[None, None], caption)
            caption_mask = torch.where(d, null_mask[None, None], caption_mask)
        # one memory layout whether or not a caption was dropped: compiled blocks guard on it (a recompile otherwise)
        return caption, caption_mask.contiguous()

    def _null_embedding(self, length: int) -> torch.Tensor:
        null = self.y_embedder.null_caption_embedding
        if self.null_caption_prefix is not None:  # MAGI-1 cuts the padded caption back to its length
            null = torch.cat([self.null_caption_prefix.to(null), null])
        return null[:length]

    def null_caption(self, batch: int, num_chunks: int, length: int | None = None):
        """The empty prompt: (emb [B, n, L, C], mask [B, n, L]) as MAGI-1 feeds for unconditional passes."""
        L = length or self.cfg.caption_max_length
        emb = self._null_embedding(L)[None, None].expand(batch, num_chunks, -1, -1)
        mask = (torch.arange(L, device=emb.device) < self.cfg.null_caption_tokens)[None, None].expand(batch, num_chunks, -1)
        return emb, mask

    def build_context(self, x_shape, t, caption, caption_mask=None, caption_dropped=None, dt=None, *,
                      chunk_offset: int = 0, kv_cache: KVCache | None = None, cache_write: bool = False,
                      lookback=None, layout: ChunkLayout | None = None, caption_null=None):
        """Everything the layers need except the hidden states (cheap; pipeline stages rebuild it).
        caption_dropped [B] or [B, n]: the null caption and the 'dropped' flag; caption_null [B, n] (optional): the
        null caption under the chunk's own flag (clean context chunks at cfg 1: diffusion.context_encoding)."""
        cfg = self.cfg
        B, _, T, H, W = x_shape
        if T % cfg.chunk_width:
            raise ValueError(f"x: {T} latent frames is not a multiple of model.chunk_width={cfg.chunk_width}")
        n = T // cfg.chunk_width
        tf, h, w = T // cfg.t_patch_size, H // cfg.patch_size, W // cfg.patch_size
        tokens_per_chunk = (cfg.chunk_width // cfg.t_patch_size) * h * w
        device = self.rope.bands.device
        if t.dim() == 1:
            t = t[:, None].expand(-1, n)
        if t.shape != (B, n):
            raise ValueError(f"t: expected shape [{B}, {n}] (one noise level per chunk), got {tuple(t.shape)}")
        if caption_dropped is None:
            caption_dropped = torch.zeros(B, n, dtype=torch.bool, device=device)
        caption_dropped = caption_dropped.to(device=device, dtype=torch.bool)
        if caption_dropped.dim() == 1:  # one flag per sample -> every chunk
            caption_dropped = caption_dropped[:, None].expand(-1, n)
        if caption_dropped.shape != (B, n):
            raise ValueError(f"caption_dropped: expected [{B}] or [{B}, {n}], got {tuple(caption_dropped.shape)}")
        null_rows = caption_dropped
        if caption_null is not None:
            null_rows = caption_dropped | caption_null.to(device=device, dtype=torch.bool).reshape(B, n)
        caption, caption_mask = self._captions(caption.to(device), None if caption_mask is None else
                                               caption_mask.to(device), null_rows, n)
        with torch.autocast(device_type=device.type, enabled=False):
            cond = self.t_embedder(t.to(device).float().flatten()).reshape(B, n, -1)
            if cfg.distill:
                if dt is None:
                    raise ValueError("dt: a distilled model (model.distill=true) needs the step size per chunk")
                dt = dt.to(device).float()
                dt = dt[:, None].expand(-1, n) if dt.dim() == 1 else dt
                cond = cond + self.t_embedder(dt.flatten()).reshape(B, n, -1)
            cond = cond + self.y_embedder.adaln(caption_dropped.flatten()).reshape(B, n, -1)
            cap = self.y_embedder.xattn(caption.float())
            frames_before = chunk_offset * (cfg.chunk_width // cfg.t_patch_size)
            cos, sin = self.rope(frames_before, tf, h, w, device)
        if layout is None:
            cached = kv_cache.chunks(self.held_layers()[0].layer_number) if kv_cache is not None else ()
            layout = ChunkLayout.causal(n, tokens_per_chunk, chunk_offset, cached, lookback)
        token_chunk = torch.arange(n, device=device).repeat_interleave(tokens_per_chunk)
        ctx = BlockContext(cond=cond, token_chunk=token_chunk, rope_cos=cos, rope_sin=sin, caption=cap,
                           caption_mask=caption_mask, layout=layout, kv_cache=kv_cache, cache_write=cache_write)
        return ctx, (B, tf, h, w)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> hidden states [S, B, D] in (T H W) order, token-major in memory. The rearrange alone
        is a view of the patch embedding's [B, D, T, H, W] output, feature-major: every layer's LayerNorm then
        copied it to rows first (a transposing copy of the residual stream, twice a layer, at about 0.7 TB/s on
        the H200: 146 ms of a 3.7 s distilled 480p chunk, docs/benchmarks.md issue 19), and the residual
        additions kept that layout through all layers."""
        cfg = self.cfg
        x = x * cfg.x_rescale_factor
        if cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.x_embedder(x.float().to(self.x_embedder.weight.dtype))
        return rearrange(h, "b d t h w -> (t h w) b d").contiguous()

    def head(self, h: torch.Tensor, grid) -> torch.Tensor:
        cfg = self.cfg
        B, tf, hh, ww = grid
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = self.videodit_blocks.final_layernorm(h.float())
            h = self.final_linear.linear(h.to(self.final_linear.linear.weight.dtype)).float()
        out = rearrange(h, "(t h w) b (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=tf, h=hh, w=ww,
                        pt=cfg.t_patch_size, ph=cfg.patch_size, pw=cfg.patch_size)
        if cfg.half_channel_vae:
            out = out[:, : cfg.out_channels // 2]
        return out / cfg.x_rescale_factor

    # ------------------------------------------------------------------ forward
    def forward(self, x, t, caption, caption_mask=None, caption_dropped=None, dt=None, *, chunk_offset: int = 0,
                kv_cache: KVCache | None = None, cache_write: bool = False, lookback=None,
                layout: ChunkLayout | None = None, latent_shape=None, caption_null=None) -> torch.Tensor:
        """x: the latent [B, C, T, H, W]. A pipeline stage's shell (magi_train.parallel) runs this same forward:
        without x_embedder it takes the previous stage's hidden states as x (latent_shape then gives the latent's
        shape), placeholders stand for the layers other stages hold, and without final_linear it returns hidden
        states. Context parallelism (set from outside) shards the tokens after embedding and gathers them back."""
        first, last = self.x_embedder is not None, self.final_linear is not None
        shape = x.shape if first else latent_shape
        if shape is None:
            raise ValueError("latent_shape: a model without x_embedder (a later pipeline stage) needs the latent's shape")
        ctx, grid = self.build_context(shape, t, caption, caption_mask, caption_dropped, dt, chunk_offset=chunk_offset,
                                       kv_cache=kv_cache, cache_write=cache_write, lookback=lookback, layout=layout,
                                       caption_null=caption_null)
        seq_len = ctx.layout.q_len
        cp = self.context_parallel
        if first:
            h = self.embed_tokens(x).to(self.dtype)
            if cp is not None:
                h, ctx = cp.shard(h, ctx)
        else:
            h = x
            if cp is not None:
                ctx = cp.shard_context(ctx)
        for layer in self.held_layers():
            h = layer(h, ctx)
        if not last:
            return h.contiguous()
        if cp is not None:
            h = cp.gather(h, seq_len)
        return self.head(h, grid)

    def held_layers(self) -> list[TransformerLayer]:
        """The transformer layers this module holds (all of them, except in a pipeline stage's shell)."""
        return [m for m in self.videodit_blocks.layers if isinstance(m, TransformerLayer)]

    @property
    def dtype(self) -> torch.dtype:
        layers = self.held_layers()
        return layers[0].mlp.layer_norm.weight.dtype if layers else torch.float32


FP32_MODULE_PREFIXES = ("x_embedder", "t_embedder", "y_embedder", "rope", "final_linear")


def build_dit(cfg: ModelConfig, spec: LayerSpec | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> MagiDiT:
    """Build on `device` ('meta' for shape-only / later materialisation). Block weights take `dtype`
    (default: cfg.params_dtype); embedders, RoPE and the final linear stay fp32 as in MAGI-1."""
    dtype = dtype or DTYPES[cfg.params_dtype]
    with torch.device(device):
        model = MagiDiT(cfg, spec)
    init_weights(model)
    if dtype != torch.float32:
        for name, module in model.named_children():
            if name == "videodit_blocks":
                module.to(dtype)
    return model


@torch.no_grad()
def init_weights(model: MagiDiT, std: float = 0.02) -> None:
    """Truncated-normal linears, zero biases, zero-centred norms, zero final projection (starts at v = 0)."""
    if model.rope.bands.is_meta:
        return
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)) or hasattr(m, "weight") and m.__class__.__name__.endswith("ParallelLinear"):
            w = getattr(m, "weight", None)
            if w is not None and w.dim() >= 2:
                nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                b.zero_()
    nn.init.zeros_(model.final_linear.linear.weight)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
