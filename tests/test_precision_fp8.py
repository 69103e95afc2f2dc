"""fp8 training paths against bf16 on the same inputs (GPU), and clear errors where the parts are missing."""
import importlib.util

import pytest
import torch

from conftest import randomize_
from magi_train.config import model_preset
from magi_train.model import build_dit
from magi_train.precision.fp8_training import Fp8Settings, apply_torchao_float8, forward_context

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def test_unknown_fp8_mode_is_named():
    with pytest.raises(ValueError, match="train.fp8: got 'fp4'"):
        Fp8Settings(mode="fp4")
    assert forward_context(Fp8Settings("torchao")) is None and forward_context(Fp8Settings()) is None


@pytest.mark.skipif(HAS_TE, reason="checks the error raised without Transformer Engine")
def test_te_spec_without_te_says_how_to_install():
    from magi_train.config import ParallelConfig
    from magi_train.parallel import parallelize
    from magi_train.parallel.env import ParallelEnv

    with pytest.raises(RuntimeError, match=r"model.layer_spec='te' \(which train.fp8='te' selects\) needs Transformer"):
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
    assert n == layers * 7  # q, qx, k, v, proj, fc1, fc2 of every block (caption K/V: a few hundred tokens)
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


@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
@pytest.mark.parametrize("recipe", ["delayed", "current", "block"])
def test_te_recipes_are_te_objects(recipe):
    from transformer_engine.common import recipe as te_recipe_module

    from magi_train.precision.fp8_training import te_recipe

    r = te_recipe(recipe)
    assert isinstance(r, te_recipe_module.Recipe)
    assert forward_context(Fp8Settings("te", recipe)) is not None


@pytest.mark.skipif(not (HAS_TE and HAS_FP8_GPU), reason="needs Transformer Engine and a GPU with fp8 GEMMs")
def test_te_fp8_forward_close_to_bf16():
    from magi_train.config import ParallelConfig, TrainConfig
    from magi_train.parallel import parallelize
    from magi_train.parallel.env import ParallelEnv
    from magi_train.training.runtime import model_transforms

    cfg = model_preset("debug", hidden_size=512, ffn_hidden_size=2048, kv_channels=64)
    ref = randomize_(build_dit(cfg), std=0.02).cuda()
    env = ParallelEnv(pcfg=ParallelConfig(dp=1), device=torch.device("cuda"))
    te_model = parallelize(model_preset("debug", hidden_size=512, ffn_hidden_size=2048, kv_channels=64,
                                        layer_spec="te"), env=env, full_state=ref.state_dict(),
                           transforms=model_transforms(TrainConfig(fp8="te", fp8_recipe="current")))
    x = torch.randn(2, 16, 12, 16, 16, device="cuda")
    t, cap = torch.rand(2, 2, device="cuda"), torch.randn(2, 8, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(x, t, cap)
        with te_model.magi_parallel.forward_context():
            b = te_model(x, t, cap)
    assert ((a - b).float().norm() / a.float().norm()).item() < 0.1
