"""fp8 training paths against bf16 on the same inputs (GPU), and clear errors where the parts are missing."""
import importlib.util

import pytest
import torch

from conftest import randomize_
from magi_train.config import model_preset
from magi_train.model import build_dit
from magi_train.precision.fp8_training import apply_torchao_float8, fp8_autocast

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_unknown_fp8_mode_is_named():
    with pytest.raises(ValueError, match="train.fp8: got 'fp4'"):
        fp8_autocast("fp4")


@pytest.mark.skipif(HAS_TE, reason="checks the error raised without Transformer Engine")
def test_te_spec_without_te_says_how_to_install():
    from magi_train.config import ParallelConfig
    from magi_train.parallel import parallelize
    from magi_train.parallel.env import ParallelEnv

    with pytest.raises(RuntimeError, match="model.layer_spec='te' needs Transformer Engine"):
        parallelize(model_preset("tiny", layer_spec="te"), env=ParallelEnv(pcfg=ParallelConfig(dp=1)))


def test_local_layer_spec_refuses_tensor_parallel():
    from magi_train.config import ConfigError, ParallelConfig
    from magi_train.parallel.env import ParallelEnv
    from magi_train.parallel.parallelize import build_layer_spec

    env = ParallelEnv(pcfg=ParallelConfig(tp=2, dp=1), tp=2)
    with pytest.raises(ConfigError, match="model.layer_spec: 'local' linears are not tensor parallel"):
        build_layer_spec(model_preset("tiny", layer_spec="local"), env, False, torch.float32)
    assert build_layer_spec(model_preset("tiny"), ParallelEnv(pcfg=ParallelConfig(dp=1)), False, torch.float32) is None


def test_torchao_filter_keeps_fp32_islands():
    model = build_dit(model_preset("debug"))
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed")
    n = apply_torchao_float8(model)
    layers = len(model.videodit_blocks.layers)
    assert n == layers * 8  # q, qx, k, v, kv_xattn, proj, fc1, fc2 of every block
    assert type(model.final_linear.linear) is torch.nn.Linear
    assert type(model.videodit_blocks.layers[0].ada_modulate_layer.proj[0]) is torch.nn.Linear


@pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a GPU with fp8 GEMMs")
def test_torchao_float8_close_to_bf16():
    torch.manual_seed(0)
    ref = randomize_(build_dit(model_preset("debug", hidden_size=512, ffn_hidden_size=2048, kv_channels=64)),
                     std=0.02).cuda()
    fp8 = build_dit(model_preset("debug", hidden_size=512, ffn_hidden_size=2048, kv_channels=64)).cuda()
    fp8.load_state_dict(ref.state_dict())
    apply_torchao_float8(fp8)
    x = torch.randn(2, 16, 12, 16, 16, device="cuda")
    t, cap = torch.rand(2, 2, device="cuda"), torch.randn(2, 8, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(x, t, cap), fp8(x, t, cap)
    rel = ((a - b).float().norm() / a.float().norm()).item()
    assert rel < 0.1, rel  # stated bound: 10% relative L2 on the velocity (e4m3 tensorwise, random weights)
    b.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in fp8.parameters() if p.requires_grad)
