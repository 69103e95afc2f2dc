"""Flow matching for MAGI-1: training objective and per-chunk noise levels (flow_matching, t_sampler), inference
schedules and steps (sampling). Convention: x_t = t*x1 + (1-t)*noise, t = 1 clean, v = x1 - noise."""
from . import sampling as _sampling
from .context_encoding import context_dropped, context_flags
from .flow_matching import (FlowMatchingLoss, TBinStats, chunk_mse, expand_to_frames, loss_from_output,
                            noisy_latent, num_chunks_of, prepare_inputs, velocity_target, weighted_chunk_loss)
from .sampling import *  # noqa: F401,F403
from .t_sampler import ChunkNoise, clean_prefix_lengths, sample_chunk_t, t_quantile

__all__ = ["context_dropped", "context_flags", "ChunkNoise", "clean_prefix_lengths", "sample_chunk_t", "t_quantile",
           "FlowMatchingLoss", "TBinStats", "chunk_mse", "expand_to_frames", "loss_from_output", "noisy_latent", "num_chunks_of", "prepare_inputs",
           "velocity_target", "weighted_chunk_loss", *_sampling.__all__]
