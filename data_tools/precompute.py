"""Raw shards -> latent shards: VAE latents + caption embeddings + metadata (layout: magi_train.data.shard_format).

    python -m data_tools.precompute RAW_SHARDS OUT_DIR [--vae-kind small|magi --vae-path DIR]
        [--text-kind hash|t5 --text-path DIR] [--resolution H W] [--max-frames N] [--dtype bfloat16] [--procs N]
    torchrun --nproc-per-node 8 -m data_tools.precompute RAW_SHARDS OUT_DIR --device cuda ...

Uses the encoder classes of inference (magi_train.encoders), so training sees exactly the latents the
sampler decodes. Resumable: an output shard is written whole under a temporary name and renamed, and shards
already in OUT_DIR are skipped. Work is split by shard over torchrun ranks (RANK / WORLD_SIZE) and, within a
rank, over --procs processes. Corrupt samples are skipped and listed in OUT_DIR/precompute-report-*.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from magi_train.data.dataset_index import resolve_shards
from magi_train.data.sample_decode import resize_cover_crop
from magi_train.data.shard_format import VIDEO_EXTS, load_index, read_members, write_shard
from magi_train.data.video_codec import CorruptVideoError, read_video
from magi_train.dtypes import DTYPES


@dataclass
class PrecomputeReport:
    rank: int
    world_size: int
    shards_written: list[str] = field(default_factory=list)
    shards_already_done: list[str] = field(default_factory=list)
    samples_written: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)   # (shard/key, reason)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _prepare_video(frames: np.ndarray, vae, resolution, max_frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [1, 3, T, H, W] in [-1, 1], resized/cropped so the VAE can encode it."""
    if max_frames is not None:
        frames = frames[:max_frames]
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()   # [T, 3, H, W]
    sf = int(vae.spatial_factor)
    if resolution is not None:
        video = resize_cover_crop(video, *resolution)
    h, w = video.shape[-2:]
    ch, cw = h - h % sf, w - w % sf    # a centre crop to whole latent pixels
    if (ch, cw) != (h, w):
        if ch == 0 or cw == 0:
            raise ValueError(f"frame {h}x{w} is smaller than the VAE's spatial factor {sf}")
        top, left = (h - ch) // 2, (w - cw) // 2
        video = video[..., top:top + ch, left:left + cw]
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def _tensor_bytes(name: str, t: torch.Tensor) -> bytes:
    return save_safetensors({name: t.contiguous()})


def _encoder_facts(vae, text_encoder) -> dict:
    return {"vae": {"class": type(vae).__name__, "latent_channels": int(vae.latent_channels),
                    "spatial_factor": int(vae.spatial_factor), "temporal_factor": int(vae.temporal_factor),
                    "scale_factor": float(getattr(vae, "scale_factor", 1.0))},
            "text_encoder": {"class": type(text_encoder).__name__, "dim": int(text_encoder.dim),
                             "max_length": int(text_encoder.max_length)}}


def encode_shard(src: str, dst: Path, vae, text_encoder, resolution=None, max_frames=None, dtype="float32",
                 report: PrecomputeReport | None = None) -> int:
    """Encode every readable sample of one raw shard into a latent shard at dst; returns samples written."""
    out_dtype = DTYPES[dtype]
    facts = _encoder_facts(vae, text_encoder)
    decoded = []   # (key, meta, caption, video tensor)
    index = load_index(src)
    with open(src, "rb") as f:
        for ref in index.samples:
            try:
                members = read_members(f, ref)
                ext = next((e for e in VIDEO_EXTS if e in members), None)
                if ext is None:
                    raise ValueError("no video member")
                meta = json.loads(members["json"]) if "json" in members else {}
                caption = members["txt"].decode("utf-8").strip() if "txt" in members else meta.get("caption", "")
                frames, fps = read_video(members[ext])
                decoded.append((ref.key, {**meta, "fps": fps, "source_frames": int(frames.shape[0]),
                                          "source_height": int(frames.shape[1]),
                                          "source_width": int(frames.shape[2])},
                                caption, _prepare_video(frames, vae, resolution, max_frames)))
            except (CorruptVideoError, ValueError, OSError, EOFError, UnicodeDecodeError) as e:
                if report is not None:
                    report.corrupt.append((f"{Path(src).name}/{ref.key}", str(e)))
    samples = []
    if decoded:
        emb, mask = text_encoder.encode([d[2] for d in decoded])
        for i, (key, meta, caption, video) in enumerate(decoded):
            try:
                latent = vae.encode(video.to(getattr(vae, "device", "cpu")))[0].float().cpu()
            except (ValueError, RuntimeError) as e:   # e.g. a size the VAE cannot take
                if report is not None:
                    report.corrupt.append((f"{Path(src).name}/{key}", f"vae: {e}"))
                continue
            tokens = emb[i][mask[i].bool()].float().cpu()   # only the valid tokens (see shard_format)
            meta.update(facts, key=key, frames=int(video.shape[2]), height=int(video.shape[3]),
                        width=int(video.shape[4]), latent_shape=list(latent.shape), latent_dtype=dtype,
                        text_length=int(tokens.shape[0]), text_dim=int(tokens.shape[1]))
            samples.append((key, {"latent.safetensors": _tensor_bytes("latent", latent.to(out_dtype)),
                                  "text.safetensors": _tensor_bytes("emb", tokens.to(out_dtype)),
                                  "txt": caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}))
    write_shard(dst, samples)   # an empty shard still marks the input as done
    return len(samples)


def precompute(raw_shard_dir, out_dir, vae, text_encoder, resolution: tuple[int, int] | None = None,
               max_frames: int | None = None, dtype: str = "float32", rank: int | None = None,
               world_size: int | None = None, progress: bool = True) -> PrecomputeReport:
    """Encode this rank's share of the raw shards (shard i goes to rank i % world_size; rank and world_size
    default to torchrun's RANK / WORLD_SIZE). Output shards keep their input names; existing ones are skipped."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, accepted values are {', '.join(DTYPES)}")
    env_rank, env_world = dist_rank_world()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    shards = resolve_shards(str(raw_shard_dir), key="raw")
    mine = shards[rank::world_size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = PrecomputeReport(rank, world_size)
    was_training = bool(getattr(vae, "training", False))
    if was_training:
        vae.eval()
    with torch.no_grad():
        for src in tqdm(mine, desc=f"precompute rank {rank}/{world_size}", unit="shard", disable=not progress):
            dst = out / Path(src).name
            if dst.exists():
                report.shards_already_done.append(dst.name)
                continue
            report.samples_written += encode_shard(src, dst, vae, text_encoder, resolution, max_frames, dtype, report)
            report.shards_written.append(dst.name)
    if was_training:
        vae.train()
    path = out / f"precompute-report-rank{rank:05d}-of-{world_size:05d}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(report), indent=1))
    os.replace(tmp, path)
    return report


# --- command line: encoders from configs, several processes per rank ---

def _build_encoders(args: dict, device: str):
    from magi_train.encoders import TextEncoderConfig, VAEConfig, build_text_encoder, build_vae
    vae = build_vae(VAEConfig(kind=args["vae_kind"], path=args["vae_path"], dtype=args["vae_dtype"], device=device))
    text = build_text_encoder(TextEncoderConfig(kind=args["text_kind"], path=args["text_path"], device=device))
    return vae, text


def _run_process(args: dict, proc: int, procs: int) -> dict:
    rank, world = dist_rank_world()
    device = args["device"]
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0)) * procs + proc
        device = f"cuda:{local % max(torch.cuda.device_count(), 1)}"
    if procs > 1:   # a spawned process: share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    vae, text = _build_encoders(args, device)
    rep = precompute(args["raw"], args["out"], vae, text, resolution=args["resolution"], max_frames=args["max_frames"],
                     dtype=args["dtype"], rank=rank * procs + proc, world_size=world * procs,
                     progress=proc == 0)
    return asdict(rep)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("raw", help="raw shards: directory, glob or brace pattern")
    ap.add_argument("out")
    ap.add_argument("--vae-kind", default="small", choices=("small", "magi"))
    ap.add_argument("--vae-path", default=None)
    ap.add_argument("--vae-dtype", default="float32")
    ap.add_argument("--text-kind", default="hash", choices=("hash", "t5"))
    ap.add_argument("--text-path", default=None)
    ap.add_argument("--resolution", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="storage dtype of latents and text")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--procs", type=int, default=1, help="processes per rank")
    args = vars(ap.parse_args(argv))
    procs = args.pop("procs")
    if procs < 1:
        raise SystemExit(f"--procs: must be >= 1, got {procs}")
    try:
        resolve_shards(args["raw"], key="raw")   # a missing input is one line, before any encoder loads
        if procs == 1:
            reps = [_run_process(args, 0, 1)]
        else:
            with mp.get_context("spawn").Pool(procs) as pool:
                reps = pool.starmap(_run_process, [(args, p, procs) for p in range(procs)])
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError) as e:
        raise SystemExit(f"precompute: {e}") from None
    done = sum(len(r["shards_written"]) for r in reps)
    skipped = sum(len(r["shards_already_done"]) for r in reps)
    corrupt = [c for r in reps for c in r["corrupt"]]
    print(f"precompute: {done} shards written, {skipped} already done, "
          f"{sum(r['samples_written'] for r in reps)} samples, {len(corrupt)} corrupt")
    for name, why in corrupt[:20]:
        print(f"  corrupt: {name}: {why}")


if __name__ == "__main__":
    main()
