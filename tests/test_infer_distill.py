"""Distilled (step-size conditioned) models and the MAGI-1 fp8 checkpoint format through the same pipeline."""
import pytest
import torch
from conftest import randomize_

from magi_infer.conditioning import Conditioning
from magi_infer.config import load_infer_config
from magi_infer.pipeline import ChunkGenerator
from magi_infer.runner import build_model
from magi_train.model import build_dit
from magi_train.checkpoint.magi_format import quantize_to_magi_fp8, save_magi_checkpoint, write_safetensors
from magi_train.precision.magi_fp8 import Fp8Linear

HW = (4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny distilled model saved as MAGI-1 does: inference_weight.distill/ and inference_weight.fp8.distill/."""
    root = tmp_path_factory.mktemp("distill_ckpt")
    cfg = load_infer_config("configs/infer/tiny_distill.yaml", ["model.num_layers=3"])
    torch.manual_seed(0)
    model = randomize_(build_dit(cfg.model), std=0.05, seed=2)
    save_magi_checkpoint(model, root / "inference_weight.distill")
    write_safetensors(quantize_to_magi_fp8(model), root / "inference_weight.fp8.distill")
    return root


def _config(root, fp8):
    return load_infer_config("configs/infer/tiny_distill.yaml",
                             ["model.num_layers=3", f"load={root}", f"fp8_quant={'true' if fp8 else 'false'}"])


def _cond(model, n):
    g = torch.Generator().manual_seed(5)
    c = model.cfg
    return Conditioning(torch.randn(1, n, c.caption_max_length, c.caption_channels, generator=g),
                        torch.ones(1, n, c.caption_max_length, dtype=torch.bool))


@torch.no_grad()
def test_distilled_fp8_checkpoint_runs_the_shortcut_schedule(checkpoint):
    n = 2
    cfg = _config(checkpoint, fp8=True)
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    assert any(isinstance(m, Fp8Linear) for m in model.modules())
    calls = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        gen = ChunkGenerator(model, cfg.sampler, _cond(model, n), n, HW, seed=0)
        # the 12-step "8,16,16" schedule: step-size condition 4 for a 1/8 step, 8 for a 1/16 step
        for ws in gen.schedule[:6]:
            dt = gen.window_input(ws).dt
            assert dt.shape == (1, len(ws.input_chunks)) and set(dt.flatten().tolist()) == {4.0 if ws.substep == 0 else 8.0}
        fp8_out = torch.cat([c.latent for c in gen], 2)
    finally:
        hook.remove()
    assert torch.isfinite(fp8_out).all()
    # one forward per schedule step, plus the nearly-clean pass while the oldest chunk's t is above 0.3
    nearly_clean = sum(1 for ws in gen.schedule if float(gen.t_grid[ws.steps[0]]) > 0.3)
    assert 0 < nearly_clean < len(gen.schedule) and len(calls) == len(gen.schedule) + nearly_clean

    ref_model = build_model(_config(checkpoint, fp8=False), torch.device("cpu"), torch.float32)
    ref = torch.cat([c.latent for c in ChunkGenerator(ref_model, cfg.sampler, _cond(ref_model, n), n, HW, seed=0)], 2)
    rel = ((fp8_out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, f"fp8 vs full precision relative error {rel:.3f}"


def test_distilled_model_needs_cfg_1(checkpoint):
    from magi_train.config import ConfigError

    with pytest.raises(ConfigError, match="cfg_number"):
        load_infer_config("configs/infer/tiny_distill.yaml", ["cfg_number=3"])
