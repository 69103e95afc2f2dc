"""Raw-video batches (data.kind=raw) -> the latent batch the objective reads, encoded in the training process.

Precomputed latent shards (data_tools/precompute.py) are faster for anything but small runs: this path runs the
VAE and the text encoder on every step."""
from __future__ import annotations

import torch

from magi_train.config import EncodersConfig, ModelConfig


class RawBatchEncoder:
    def __init__(self, cfg: EncodersConfig, model_cfg: ModelConfig):
        from magi_train.encoders.build import build_text_encoder, build_vae

        self.text = build_text_encoder(cfg.text)
        self.vae = build_vae(cfg.vae).eval()
        if self.vae.latent_channels != model_cfg.latent_channels:
            raise ValueError(f"encoders.vae: the VAE makes {self.vae.latent_channels}-channel latents but the model "
                             f"reads {model_cfg.latent_channels} (model.in_channels)")
        if self.text.dim != model_cfg.caption_channels:
            raise ValueError(f"encoders.text: the text encoder makes {self.text.dim}-wide embeddings but "
                             f"model.caption_channels={model_cfg.caption_channels}")

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        if "latent" in batch:
            return batch
        out = dict(batch)
        out["latent"] = self.vae.encode(out.pop("video")).cpu()
        emb, mask = self.text.encode(list(batch["caption"]))
        out["text_emb"], out["text_mask"] = emb.cpu(), mask.cpu()
        return out


__all__ = ["RawBatchEncoder"]
