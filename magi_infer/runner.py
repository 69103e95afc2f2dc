"""MagiRunner: the DiT, the text encoder and the VAE around the latent pipeline, from prompt to streamed mp4.

Each finished chunk is decoded and appended to the output at once; a progress bar per chunk shows the seconds
per chunk and the frames per second of video made."""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from magi_train.dtypes import DTYPES
from magi_train.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae, load_special_tokens
from magi_train.model import fused_ops
from magi_train.model.attention import resolve_backend
from magi_train.model.block import AttentionCore

from .conditioning import (Conditioning, chunk_captions, negative_tokens_from_env, null_caption_prefix,
                           special_tokens_from_env)
from .config import MODES, InferConfig
from .pipeline import ChunkGenerator, FinishedChunk, num_chunks_for
from .video_io import StreamingVideoWriter, frames_to_video, read_image, read_prefix_video, to_uint8_frames

log = logging.getLogger("magi_infer")


def resolve_device(cfg: InferConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: InferConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return DTYPES[cfg.model.params_dtype] if device.type == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


def resolve_compile(cfg: InferConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.compile is None else bool(cfg.compile)


def attention_backend(cfg: InferConfig, device: torch.device) -> str:
    """The self-attention backend the run uses. 'auto' with the MAGI-1 fp8 format (fp8_quant): cuDNN fp8 attention
    where it runs (Hopper, nvidia-cudnn-frontend, head dim 128; docs/benchmarks.md, fp8 attention), else the
    device's default; model.attention_backend=sdpa_chunked keeps exact bf16 attention."""
    if cfg.fp8_quant and cfg.model.attention_backend == "auto":
        from magi_train.model.attention_fp8 import require_cudnn_fp8

        try:
            require_cudnn_fp8(device, cfg.model.kv_channels)
            return "cudnn_fp8"
        except ValueError:
            pass
    return resolve_backend(cfg.model.attention_backend, device)


def describe_run(cfg: InferConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The line the CLI starts with: what actually runs."""
    p = cfg.parallel
    weights = str(dtype).replace("torch.", "") + (" with MAGI-1 fp8 linears" if cfg.fp8_quant else "")
    return (f"magi_infer: attention {attention_backend(cfg, device)}, dtype {weights}, "
            f"device {device}, layout tp{p.tp} cp{p.cp} pp{p.pp}, compile {'on' if resolve_compile(cfg, device) else 'off'}")


def build_model(cfg: InferConfig, device: torch.device, dtype: torch.dtype):
    """The DiT of one process with cfg.load's weights (MAGI-1 directory layout, fp8 included), or random weights
    without load (model_build.py; torchrun layouts get theirs from the cli)."""
    from .distributed import single_process_env
    from .model_build import build_inference_dit

    return build_inference_dit(cfg, single_process_env(device), dtype)


def build_encoders(cfg: InferConfig, device: torch.device):
    """Text encoder and VAE from the run-time keys: T5 / MAGI-1 VAE from their paths; without paths the offline hash
    encoder and an untrained small VAE shaped for the model (tests, benchmarks)."""
    m = cfg.model
    if cfg.t5_pretrained:
        text = TextEncoderConfig(kind="t5", path=cfg.t5_pretrained, device=cfg.t5_device, max_length=m.caption_max_length)
    else:
        text = TextEncoderConfig(kind="hash", max_length=m.caption_max_length, dim=m.caption_channels)
    vae_device = str(device)
    if cfg.vae_pretrained:
        small = (Path(cfg.vae_pretrained) / "config.json").exists() and \
            json.loads((Path(cfg.vae_pretrained) / "config.json").read_text()).get("format") == "magi-small-vae"
        vae = VAEConfig(kind="small" if small else "magi", path=cfg.vae_pretrained, device=vae_device,
                        scale_factor=None if small else cfg.scale_factor,
                        temporal_downsample_factor=cfg.temporal_downsample_factor, tile_frames=max(cfg.fps // 2, 1))
    else:
        torch.manual_seed(cfg.seed)
        vae = VAEConfig(kind="small", latent_channels=m.latent_channels, spatial_downsample_factor=8,
                        temporal_downsample_factor=cfg.temporal_downsample_factor, base_channels=8, device=vae_device)
    return build_text_encoder(text), build_vae(vae).eval()


class MagiRunner:
    def __init__(self, cfg: InferConfig, model=None, text_encoder=None, vae=None):
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        if text_encoder is None or vae is None:
            te, va = build_encoders(cfg, self.device)
            text_encoder, vae = text_encoder or te, vae or va
        self.text_encoder, self.vae = text_encoder, vae
        cfg.check_sizes(vae.spatial_factor, vae.temporal_factor)
        if vae.latent_channels != cfg.model.latent_channels:
            raise ValueError(f"vae: {vae.latent_channels} latent channels, the DiT takes {cfg.model.latent_channels}")
        self.model = model if model is not None else build_model(cfg, self.device, self.dtype)
        backend = attention_backend(cfg, self.device)
        for core in (m for m in self.model.modules() if isinstance(m, AttentionCore)):
            core.backend = backend
        fused_ops.use_compiled(resolve_compile(cfg, self.device))

    # ------------------------------------------------------------------ conditioning
    def _prefix(self, mode: str, image_path: str | None, prefix_video_path: str | None) -> torch.Tensor | None:
        c = self.cfg
        if mode == "t2v":
            return None
        if mode == "i2v":
            if not image_path:
                raise ValueError("image_path: i2v mode needs --image_path")
            frames = read_image(image_path, c.video_size_w, c.video_size_h)
        else:
            if not prefix_video_path:
                raise ValueError("prefix_video_path: v2v mode needs --prefix_video_path")
            frames = read_prefix_video(prefix_video_path, c.fps, c.video_size_w, c.video_size_h, c.prefix_frames)
        with torch.no_grad():
            return self.vae.encode(frames_to_video(frames).to(self.device)).float()

    def conditioning(self, mode: str, prompts: Sequence[str], starts: Sequence[int] | None = None,
                     image_path: str | None = None, prefix_video_path: str | None = None
                     ) -> tuple[Conditioning, int]:
        if mode not in MODES:
            raise ValueError(f"mode: got {mode!r}, accepted values are {', '.join(MODES)}")
        c = self.cfg
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompt: at least one prompt is needed")
        # without start chunks, prompt k starts at chunk k (the last one holds to the end)
        starts = list(starts) if starts is not None else list(range(len(prompts)))
        if len(starts) != len(prompts):
            raise ValueError(f"prompt_start_chunks: {len(prompts)} prompts need {len(prompts)} start chunks, got {starts}")
        prefix = self._prefix(mode, image_path, prefix_video_path)
        P = 0 if prefix is None else prefix.shape[2]
        cw = c.model.chunk_width
        n_total = num_chunks_for(self.vae.latent_frames(c.num_frames), P, cw)
        n_gen = n_total - P // cw
        emb, mask = self.text_encoder.encode(prompts)
        # MAGI-1's scripts pick the token file and the tokens through SPECIAL_TOKEN_PATH and PAD_* variables
        names = c.special_tokens if c.special_tokens is not None else special_tokens_from_env()
        token_path = c.special_tokens_path or os.environ.get("SPECIAL_TOKEN_PATH")
        if token_path and not Path(token_path).exists():
            raise FileNotFoundError(f"special_tokens_path: {token_path} does not exist")
        caption, cmask = chunk_captions(emb.cpu(), mask.cpu(), starts, n_gen, c.model.caption_max_length,
                                        token_path, names)
        negative = c.negative_special_tokens if c.negative_special_tokens is not None else negative_tokens_from_env()
        null_prefix = None
        if negative and token_path:
            null_prefix = null_caption_prefix(load_special_tokens(token_path), negative)
        elif negative:
            log.warning("negative special tokens asked for (NEG_PROMPT) but no special_tokens_path: none are added")
        return Conditioning(caption, cmask, prefix, emit_prefix=(mode == "i2v"), null_prefix=null_prefix), n_total

    # ------------------------------------------------------------------ generation
    def generator(self, mode: str, prompts: Sequence[str], starts=None, image_path=None, prefix_video_path=None
                  ) -> ChunkGenerator:
        cond, n_total = self.conditioning(mode, prompts, starts, image_path, prefix_video_path)
        sf = self.vae.spatial_factor
        return ChunkGenerator(self.model, self.cfg.sampler, cond, n_total,
                              (self.cfg.video_size_h // sf, self.cfg.video_size_w // sf), seed=self.cfg.seed,
                              device=self.device)

    def decode(self, chunk: FinishedChunk):
        with torch.no_grad():
            return to_uint8_frames(self.vae.decode(chunk.latent[:1].to(self.device)))

    def frames(self, gen: ChunkGenerator, write=None) -> Iterator[tuple[FinishedChunk, np.ndarray]]:
        """Finished chunks with their pixels, in order; each is decoded on a second thread (and CUDA stream) while
        the generator denoises the next ones. write(pixels), if given, runs on that thread too, after the decode:
        the thread that queues the GPU's work does nothing else."""
        yield from _decoded_in_background(gen, self.decode, self.device, write)

    def run(self, mode: str, prompts: Sequence[str], output_path: str, starts=None, image_path=None,
            prefix_video_path=None, progress: bool = True, on_chunk=None) -> dict:
        """Generate and stream to output_path; returns timing stats. on_chunk(chunk, writer) runs after each write.

        seconds_per_chunk: time between chunks ready as pixels in the file (decoded, written), the first from the
        start."""
        c = self.cfg
        gen = self.generator(mode, prompts, starts, image_path, prefix_video_path)
        bar = tqdm(total=gen.num_generated_chunks, desc=f"magi {mode}", unit="chunk", disable=not progress)
        times, frames = [], 0
        start = last = time.perf_counter()
        with StreamingVideoWriter(output_path, c.fps, c.video_size_w, c.video_size_h, c.crf, c.frames_dir) as writer:
            for chunk, pixels in self.frames(gen, writer.write):
                now = time.perf_counter()
                times.append(chunk.ready_s - last)  # ready in the file, not when this loop got round to it
                last = chunk.ready_s
                frames += len(pixels)
                bar.set_postfix_str(f"{times[-1]:.1f}s/chunk, {frames / (now - start):.2f} frames/s")
                bar.update(1)
                if on_chunk is not None:
                    on_chunk(chunk, writer)
        bar.close()
        total = time.perf_counter() - start
        return {"chunks": len(times), "frames": frames, "seconds": total, "seconds_per_chunk": times,
                "frames_per_second": frames / total if total else 0.0, "forwards": gen.forwards,
                "kv_cache": gen.cache.stats(), "output_path": str(output_path)}


def _decoded_in_background(chunks, decode, device: torch.device, write=None
                           ) -> Iterator[tuple[FinishedChunk, np.ndarray]]:
    """Iterate `chunks` (the denoising loop) here and decode (then write, if given) each on a worker thread,
    yielding (chunk, pixels) in order. On CUDA the worker decodes on its own stream after the chunk's latent is
    ready, so the VAE overlaps the next forwards; its copy to the host waits for the decode only."""
    todo: queue.Queue = queue.Queue(maxsize=2)
    done: queue.Queue = queue.Queue()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    end = object()

    def work():
        try:
            while (item := todo.get()) is not end:
                chunk, ready = item
                if stream is None:
                    pixels = decode(chunk)
                else:
                    with torch.cuda.stream(stream):
                        stream.wait_event(ready)
                        chunk.latent.record_stream(stream)
                        pixels = decode(chunk)  # ends with the copy to the host: the chunk is done on the GPU
                if write is not None:
                    write(pixels)
                chunk.ready_s = time.perf_counter()
                done.put((chunk, pixels))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            done.put(e)
        done.put(end)

    worker = threading.Thread(target=work, name="magi-decode", daemon=True)
    worker.start()
    pending = 0
    try:
        for chunk in chunks:
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record()
            todo.put((chunk, ready))
            pending += 1
            while not done.empty() and pending:
                item = done.get()
                if isinstance(item, BaseException):
                    raise item
                pending -= 1
                yield item
        todo.put(end)
        while (item := done.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if worker.is_alive():
            try:
                todo.put_nowait(end)
            except queue.Full:
                pass
