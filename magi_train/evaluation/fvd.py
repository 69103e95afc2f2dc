"""Fréchet video distance from a local TorchScript I3D file (the StyleGAN-V / fvd-comparison export,
i3d_torchscript.pt, whose features match the original TensorFlow FVD). Nothing is downloaded: without a path
the caller skips FVD and says so."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

I3D_SIZE = 224


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), the trace of the root taken from the eigenvalues of
    C1^(1/2) C2 C1^(1/2) (symmetric, so no complex square root is needed)."""
    c1, c2 = torch.as_tensor(cov1, dtype=torch.float64), torch.as_tensor(cov2, dtype=torch.float64)
    w, v = torch.linalg.eigh(c1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ c2 @ root1).clamp(min=0).sqrt().sum()
    diff = torch.as_tensor(mu1, dtype=torch.float64) - torch.as_tensor(mu2, dtype=torch.float64)
    return float(diff @ diff + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        raise ValueError(f"fvd: needs at least two videos per set, got {len(f)}")
    return f.mean(0), np.cov(f, rowvar=False)


class I3DFeatures:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"fvd.i3d_path: {p} does not exist (a local i3d_torchscript.pt is needed)")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(p), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> np.ndarray:
        """uint8 videos [T, H, W, 3] -> features [N, D]; frames resized to 224x224 and scaled to [-1, 1]."""
        out = []
        for v in videos:
            x = torch.as_tensor(np.asarray(v), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1.0
            x = F.interpolate(x, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
            x = x.permute(1, 0, 2, 3)[None].to(self.device)          # [1, 3, T, 224, 224]
            out.append(self.model(x, rescale=False, resize=False, return_features=True).float().cpu().numpy())
        return np.concatenate(out)


def fvd(real: list[np.ndarray], generated: list[np.ndarray], i3d: I3DFeatures) -> float:
    return frechet_distance(*feature_stats(i3d(real)), *feature_stats(i3d(generated)))


__all__ = ["frechet_distance", "feature_stats", "I3DFeatures", "fvd"]
