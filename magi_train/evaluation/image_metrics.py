"""Per-frame PSNR and SSIM between two uint8 videos [T, H, W, 3]."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    p, t = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred: shape {p.shape} differs from target {t.shape}")
    mse = ((p - t) ** 2).reshape(len(p), -1).mean(1)
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_per_frame(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01, K2=0.03), averaged over RGB channels.
    The window shrinks for frames smaller than 11 px."""
    p = torch.as_tensor(np.asarray(pred, np.float64)).permute(0, 3, 1, 2)
    t = torch.as_tensor(np.asarray(target, np.float64)).permute(0, 3, 1, 2)
    if p.shape != t.shape:
        raise ValueError(f"pred: shape {tuple(p.shape)} differs from target {tuple(t.shape)}")
    size = min(11, p.shape[-1], p.shape[-2])
    size -= (size + 1) % 2  # odd
    w = _gaussian_window(size).repeat(3, 1, 1, 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return F.conv2d(x, w, groups=3)

    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p ** 2
    var_t = blur(t * t) - mu_t ** 2
    cov = blur(p * t) - mu_p * mu_t
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return s.mean(dim=(1, 2, 3)).numpy()
