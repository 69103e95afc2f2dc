"""Parallel inference (2 gloo processes) equals one process: context parallel (Ulysses, per-rank KV cache) and
pipeline parallel (stages reading a MAGI-1 checkpoint, each caching its own layers' K/V)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import torch_threads

from magi_infer.conditioning import Conditioning
from magi_infer.config import load_infer_config
from magi_infer.pipeline import ChunkGenerator

N, HW = 3, (4, 4)
OVERRIDES = ["num_steps=4", "window_size=2", "noise2clean_kvrange=[3,2]", "cfg_number=3"]


def _cond(cfg):
    g = torch.Generator().manual_seed(7)
    m = cfg.model
    return Conditioning(torch.randn(1, N, m.caption_max_length, m.caption_channels, generator=g),
                        torch.ones(1, N, m.caption_max_length, dtype=torch.bool))


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _generate(model, cfg):
    with torch.no_grad():
        return torch.cat([c.latent for c in ChunkGenerator(model, cfg.sampler, _cond(cfg), N, HW, seed=0)], 2)


def _pp_worker(rank, world, port, out_path, ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from magi_infer.distributed import setup_parallel
    from magi_infer.model_build import build_inference_dit
    from magi_train.parallel.env import destroy_parallel

    cfg = load_infer_config("configs/infer/tiny.yaml", OVERRIDES + ["pp_size=2", f"load={ckpt}"])
    env = setup_parallel(cfg)
    model = build_inference_dit(cfg, env, torch.float32)
    assert len(list(model.parameters())) < len(list(_randomize_like(cfg).parameters()))   # a stage, not the model
    out = _generate(model, cfg)
    if rank == 0:
        torch.save(out, out_path)
    destroy_parallel(env)


def _randomize_like(cfg):
    from magi_train.model import build_dit

    return _randomize(build_dit(cfg.model).eval())


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from magi_infer.distributed import setup_parallel
    from magi_infer.model_build import build_inference_dit
    from magi_train.parallel.env import destroy_parallel

    cfg = load_infer_config("configs/infer/tiny.yaml", OVERRIDES + ["cp_size=2"])
    env = setup_parallel(cfg)
    model = _randomize(build_inference_dit(cfg, env, torch.float32))
    assert model.context_parallel is not None
    out = _generate(model, cfg)
    if rank == 0:
        torch.save(out, out_path)
    destroy_parallel(env)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_context_parallel_equals_one_process(tmp_path):
    from magi_train.model import build_dit

    # megatron-core takes seconds to import: once here, and the forked workers inherit it
    import megatron.core.parallel_state  # noqa: F401

    out_path = tmp_path / "cp.pt"
    mp.start_processes(_worker, args=(2, _free_port(), str(out_path)), nprocs=2, join=True, start_method="fork")
    cfg = load_infer_config("configs/infer/tiny.yaml", OVERRIDES)
    with torch_threads(1):
        ref = _generate(_randomize(build_dit(cfg.model).eval()), cfg)
    torch.testing.assert_close(torch.load(out_path), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.dist
def test_pipeline_parallel_equals_one_process(tmp_path):
    from magi_train.checkpoint.magi_format import save_magi_checkpoint

    import megatron.core.parallel_state  # noqa: F401  (imported once; the forked workers inherit it)

    cfg = load_infer_config("configs/infer/tiny.yaml", OVERRIDES)
    model = _randomize_like(cfg)
    save_magi_checkpoint(model, tmp_path / "ckpt")
    out_path = tmp_path / "pp.pt"
    mp.start_processes(_pp_worker, args=(2, _free_port(), str(out_path), str(tmp_path / "ckpt")), nprocs=2,
                       join=True, start_method="fork")
    with torch_threads(1):
        ref = _generate(model, cfg)
    torch.testing.assert_close(torch.load(out_path), ref)   # float32 defaults: ~1e-6 (bit-exact on CPU)
