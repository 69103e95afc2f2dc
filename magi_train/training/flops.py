"""FLOP count of the MAGI-1 DiT (matmuls and attention; 2 FLOPs per multiply-add) and the MFU estimate.

Training FLOPs = 3 x forward (backward is twice the forward); activation recomputation is not counted, as is
usual for MFU. Chunk-causal self-attention only computes the visible (query chunk, key chunk) pairs."""
from __future__ import annotations

import torch

from magi_train.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.0, "L40": 181.0, "A6000": 155.0, "4090": 165.0, "B200": 2250.0}


def _sizes(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int):
    frames = latent_frames // cfg.t_patch_size
    S = frames * (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)
    n = max(latent_frames // cfg.chunk_width, 1)
    return S, n


def layer_linear_flops(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int,
                       caption_len: int) -> dict[str, float]:
    """Forward FLOPs of one layer's linears for one sample, by linear: qkv (q, qx, k, v), kv_xattn (caption K/V),
    proj (over [self | cross]), fc1, fc2."""
    D, qd, kvd = cfg.hidden_size, cfg.q_dim, cfg.kv_dim
    S, n = _sizes(cfg, latent_frames, latent_h, latent_w)
    ffn_out = cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1)
    return {"qkv": 2.0 * S * D * (2 * qd + 2 * kvd), "kv_xattn": 2.0 * n * caption_len * cfg.xattn_dim * 2 * kvd,
            "proj": 2.0 * S * 2 * qd * D, "fc1": 2.0 * S * D * ffn_out, "fc2": 2.0 * S * cfg.ffn_hidden_size * D}


def layer_forward_flops(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int, caption_len: int,
                        lookback: int | None = None, attention: bool = True) -> float:
    """Forward FLOPs of one transformer layer for one sample; attention=False: its linear layers only."""
    S, n = _sizes(cfg, latent_frames, latent_h, latent_w)
    tpc = S // n
    linear = sum(layer_linear_flops(cfg, latent_frames, latent_h, latent_w, caption_len).values())
    visible_pairs = sum(min(i + 1, lookback or i + 1) for i in range(n)) * tpc * tpc
    attn = 4 * cfg.q_dim * visible_pairs + 4 * cfg.q_dim * S * caption_len   # QK^T and AV, self and cross
    return float(linear + (attn if attention else 0))


def forward_flops(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int, caption_len: int,
                  lookback: int | None = None, attention: bool = True) -> float:
    """Forward FLOPs for one sample of `latent_frames` frames (whole chunks) at latent size h x w.
    attention=False leaves out the attention score/value products (only the linear layers and embedders)."""
    D = cfg.hidden_size
    S, n = _sizes(cfg, latent_frames, latent_h, latent_w)
    per_layer = layer_forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len, lookback, attention)
    patch = cfg.patch_size * cfg.patch_size * cfg.t_patch_size
    embed = 2 * S * patch * cfg.in_channels * D + 2 * S * D * patch * cfg.out_channels
    embed += 2 * n * caption_len * cfg.caption_channels * cfg.xattn_dim
    return float(cfg.num_layers * per_layer + embed)


def train_flops(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int, caption_len: int) -> float:
    return 3.0 * forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len)


def peak_flops_per_second(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one accelerator, from the override or the device name; None when unknown (CPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


__all__ = ["forward_flops", "layer_forward_flops", "layer_linear_flops", "train_flops", "peak_flops_per_second", "PEAK_BF16_TFLOPS"]
