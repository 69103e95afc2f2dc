"""Magi inference: MAGI-1's chunk pipeline on the training model definition, streamed as it is made.

Latent core: pipeline.ChunkGenerator (scheduler, guidance, kv_cache, conditioning). Around it: runner.MagiRunner
(encoders, decoding, streaming mp4 via video_io) and cli (python -m magi_infer)."""
from .conditioning import Conditioning
from .config import InferConfig, SamplerConfig, load_infer_config
from .pipeline import ChunkGenerator, FinishedChunk, generate_latents

__all__ = ["Conditioning", "InferConfig", "SamplerConfig", "load_infer_config", "ChunkGenerator", "FinishedChunk",
           "generate_latents"]
