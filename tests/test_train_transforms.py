"""The speed transforms of the training path on CPU: per-block compile composed with recompute (one graph, no
graph break, no recompile across blocks, eager gradients), the fused q/qx/k/v GEMM, and the train.* keys of
recompute and fp8 (validation, the layer-spec conflict, torchao conversion through parallelize)."""
import importlib.util

import pytest
import torch
from torch import nn

from conftest import randomize_
from magi_train.config import ConfigError, ParallelConfig, TrainConfig, model_preset
from magi_train.model import build_dit
from magi_train.model.block import fused_column_projection
from magi_train.parallel.recompute import RecomputePolicy, transformer_layers
from magi_train.parallel.transforms import ModelTransforms, apply_transforms, compile_blocks
from magi_train.training.runtime import model_transforms

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
CFG = model_preset("tiny", attention_backend="sdpa_chunked", num_layers=3)


def _inputs(cfg, chunks=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.latent_channels, chunks * cfg.chunk_width, 16, 16, generator=g)
    return x, torch.rand(1, chunks, generator=g), torch.randn(1, 8, cfg.caption_channels, generator=g)


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(*inputs).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,extra_blocks", [("none", 0), ("full", 0), ("selective", 0), ("selective", 1)])
def test_compiled_blocks_trace_one_graph_with_their_recompute(mode, extra_blocks):
    """Compile is real with recompute: every block runs the same single graph (the checkpoint traced inside it),
    with no graph break and no recompile per block or per step, and the gradients are eager's; blocks keeping
    train.recompute_keep_extra have their own graph, one for all of them."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)       # AOT autograd: the recompute is partitioned as it is for inductor

    eager = randomize_(build_dit(CFG), std=0.05)
    compiled = build_dit(CFG)
    compiled.load_state_dict(eager.state_dict())
    keep = ("qkv", "proj", "fc2") if mode == "selective" else ()
    policy = RecomputePolicy(mode, keep=keep, extra=("fc1",) if extra_blocks else (), extra_blocks=extra_blocks)
    apply_transforms(compiled, ModelTransforms(recompute=policy))
    compile_blocks(compiled, backend=counting)
    # a [B, L] caption mask, expanded over the chunks, then a step with captions dropped (a new mask tensor)
    inputs = (*_inputs(CFG), torch.ones(1, 8, dtype=torch.bool))
    dropped = (*inputs, torch.tensor([[False, True, False, True]]))
    want = _grads(eager, inputs)
    for step in (inputs, dropped, inputs):
        got = _grads(compiled, step)
    assert len(graphs) == 1 + (extra_blocks > 0), f"{len(graphs)} graphs for {CFG.num_layers} blocks x 3 steps"
    if mode != "none":
        assert any("checkpoint" in str(n.target) for n in graphs[0].graph.nodes), "recompute not in the graph"
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), n


def _backward_gemms(policy):
    """GEMMs the backward of a 2-chunk forward runs under `policy`, the gradients, and the model."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from magi_train.parallel.recompute import gemm_ops

    class Gemms(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func in gemm_ops()
            return func(*args, **(kwargs or {}))

    model = randomize_(build_dit(CFG), std=0.05)
    apply_transforms(model, ModelTransforms(recompute=policy))
    out = model(*_inputs(CFG, chunks=2)).square().mean()
    with Gemms() as seen:
        out.backward()
    return seen.count, {n: p.grad for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("keep", [(), ("proj", "fc2"), ("qkv", "proj", "fc1", "fc2")])
def test_selective_recompute_skips_the_kept_gemms(keep):
    """Selective recompute runs again in backward exactly the GEMMs of the linears it does not keep (the q/qx/k/v
    projection is one GEMM), and the gradients are those without recompute."""
    plain, want, _ = _backward_gemms(RecomputePolicy("none"))
    rerun, got, _ = _backward_gemms(RecomputePolicy("selective", keep=keep))
    # per block: the fused q/qx/k/v, caption K/V, proj, fc1, fc2 and the gating linear
    assert rerun - plain == CFG.num_layers * (6 - len(keep))
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n


def test_extra_kept_linears_skip_their_gemms_in_the_last_blocks():
    """train.recompute_keep_extra=[fc1] with recompute_extra_blocks=1: the last block also keeps fc1's output (one
    GEMM fewer run again), the others keep the default set; gradients unchanged."""
    default = ("qkv", "proj", "fc2")
    base, want, _ = _backward_gemms(RecomputePolicy("selective", keep=default))
    policy = RecomputePolicy("selective", keep=default, extra=("fc1", "fc2"), extra_blocks=1)
    rerun, got, model = _backward_gemms(policy)
    assert base - rerun == 1
    fns = [layer.recompute for layer in transformer_layers(model)]
    assert fns[0] is fns[1] and fns[2] is not fns[0]
    assert [policy.kept(i, 3) for i in range(3)] == [default, default, (*default, "fc1")]
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-6), n


def test_chunk_layout_slices_fold_into_the_graph():
    """kv_slices is plain Python: dynamo sees no data-dependent op (the nonzero() that used to break every
    compiled block into pieces, whose resumed frames then recompiled per layer on `layer == i`)."""
    model = build_dit(CFG)
    x, t, cap = _inputs(CFG)
    ctx, _ = model.build_context(x.shape, t, cap)
    h = model.embed_tokens(x)
    explained = torch._dynamo.explain(transformer_layers(model)[0])(h, ctx)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_fused_qkv_projection_equals_four_linears():
    torch.manual_seed(0)
    linears = [nn.Linear(64, n, bias=False) for n in (64, 64, 32, 32)]
    x = torch.randn(5, 2, 64, requires_grad=True)
    fused = fused_column_projection(x, linears)
    fused_grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(fused)),
                                      [x, *[m.weight for m in linears]])
    separate = [m(x) for m in linears]
    separate_grads = torch.autograd.grad(sum((o * (i + 1)).sum() for i, o in enumerate(separate)),
                                         [x, *[m.weight for m in linears]])
    for a, b in zip(fused + list(fused_grads), separate + list(separate_grads)):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_block_output_unchanged_by_the_fused_projection():
    """The block's q/qx/k/v come from one GEMM; the layer equals one computing the four projections apart."""
    torch.manual_seed(0)
    model = randomize_(build_dit(CFG), std=0.05)
    x, t, cap = _inputs(CFG)
    ctx, _ = model.build_context(x.shape, t, cap)
    h = model.embed_tokens(x)
    layer = transformer_layers(model)[0]
    qkv = layer.self_attention.linear_qkv
    normed = qkv.layer_norm(h)
    q, qx, k, v, _ = qkv(h)
    for got, m in zip((q, qx, k, v), (qkv.q, qkv.qx, qkv.k, qkv.v)):
        assert torch.allclose(got, m(normed), rtol=1e-5, atol=1e-6)
    names = {n for n, _ in layer.named_parameters()}
    assert {"self_attention.linear_qkv.q.weight", "self_attention.linear_qkv.v.weight"} <= names


def test_recompute_and_fp8_keys_are_checked():
    with pytest.raises(ConfigError, match="train.recompute: got 'some'"):
        TrainConfig(recompute="some")
    with pytest.raises(ConfigError, match="train.recompute_every"):
        TrainConfig(recompute="full", recompute_every=0)
    with pytest.raises(ConfigError, match="train.fp8: got 'fp4'"):
        TrainConfig(fp8="fp4")
    with pytest.raises(ConfigError, match="train.fp8_recipe: got 'delayed'"):
        TrainConfig(fp8="torchao", fp8_recipe="delayed")
    with pytest.raises(ConfigError, match="train.fp8_all_gather"):
        TrainConfig(fp8="torchao", fp8_recipe="rowwise", fp8_all_gather=True)
    t = model_transforms(TrainConfig(recompute="selective", recompute_every=2, compile=True, fp8="te",
                                     fp8_recipe="block"))
    assert t.recompute == RecomputePolicy("selective", 2, ("qkv", "proj", "fc2")) and t.compile
    from magi_train.config.train_config import RECOMPUTE_KEEP
    from magi_train.parallel.recompute import KEEP_LINEARS

    assert tuple(KEEP_LINEARS) == RECOMPUTE_KEEP
    with pytest.raises(ConfigError, match="train.recompute_keep: got 'fc3'"):
        TrainConfig(recompute="selective", recompute_keep=["proj", "fc3"])
    with pytest.raises(ConfigError, match="train.recompute_keep_extra: got 'fc0'"):
        TrainConfig(recompute="selective", recompute_keep_extra=["fc0"])
    with pytest.raises(ConfigError, match="train.recompute_extra_blocks: 4 blocks keep .*=selective only"):
        TrainConfig(recompute="full", recompute_keep_extra=["fc1"], recompute_extra_blocks=4)
    with pytest.raises(ConfigError, match="train.recompute_extra_blocks: must be an integer >= 0"):
        TrainConfig(recompute="selective", recompute_keep_extra=["fc1"], recompute_extra_blocks=-1)
    t2 = model_transforms(TrainConfig(recompute="selective", recompute_keep_extra=["fc1"], recompute_extra_blocks=5))
    assert (t2.recompute.extra, t2.recompute.extra_blocks) == (("fc1",), 5)
    assert (t.fp8.mode, t.fp8.resolved_recipe) == ("te", "block")
    assert model_transforms(TrainConfig(fp8="torchao")).fp8.resolved_recipe == "tensorwise"


def test_fp8_and_layer_spec_conflicts_are_one_line(tmp_path):
    from magi_train.training.config_loading import load_config

    def config_error(*overrides):
        from magi_train.config import validate_config

        with pytest.raises(ConfigError) as e:
            validate_config(load_config(["experiment=smoke", f"output_dir={tmp_path}", *overrides]))
        return str(e.value)

    assert "set model.layer_spec to 'te' or 'auto', got 'megatron'" in \
        config_error("train.fp8=te", "model.layer_spec=megatron")
    assert "train.fp8='torchao' converts plain nn.Linear" in config_error("train.fp8=torchao", "model.layer_spec=te")
    from magi_train.precision.fp8_training import resolve_layer_spec

    assert resolve_layer_spec("te", "auto") == "te" and resolve_layer_spec("none", "auto") == "auto"


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_fp8_through_parallelize(recipe):
    """train.fp8=torchao reaches the model through parallelize's transforms: the block GEMMs become Float8Linear
    with the chosen recipe, the fp32 islands stay, names and the forward stay close (CPU emulates fp8)."""
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import Float8Linear

    from magi_train.parallel import parallelize
    from magi_train.parallel.env import ParallelEnv

    cfg = model_preset("debug", attention_backend="sdpa_chunked")
    ref = randomize_(build_dit(cfg), std=0.05)
    env = ParallelEnv(pcfg=ParallelConfig(dp=1))
    model = parallelize(cfg, env=env, full_state=ref.state_dict(),
                        transforms=model_transforms(TrainConfig(fp8="torchao", fp8_recipe=recipe)))
    converted = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert len(converted) == 7 * cfg.num_layers      # q, qx, k, v, proj, fc1, fc2 (not the caption K/V)
    want = ScalingGranularity.TENSORWISE if recipe == "tensorwise" else ScalingGranularity.AXISWISE
    assert converted[0].config.cast_config_weight.scaling_granularity == want
    block = model.videodit_blocks.layers[0]
    assert type(block.ada_modulate_layer.proj[0]) is nn.Linear and type(model.final_linear.linear) is nn.Linear
    assert type(block.self_attention.linear_kv_xattn) is nn.Linear
    assert set(model.state_dict()) == set(ref.state_dict())
    inputs = _inputs(cfg, chunks=2)
    a, b = ref(*inputs), model(*inputs)
    assert ((a - b).norm() / a.norm()).item() < 0.1     # e4m3 GEMMs, random weights
    b.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_torchao_fp8_composes_with_selective_recompute_and_compile(compiled):
    """The train.* speed keys at once, in parallelize's order: the fp8 gradients are those without recompute
    (and compile; the compiled case is slow on CPU: compile time)."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    cfg = model_preset("tiny", attention_backend="sdpa_chunked", num_layers=1)
    plain = randomize_(build_dit(cfg), std=0.05)
    fast = build_dit(cfg)
    fast.load_state_dict(plain.state_dict())
    apply_transforms(plain, model_transforms(TrainConfig(fp8="torchao")))
    apply_transforms(fast, model_transforms(TrainConfig(fp8="torchao", recompute="selective")))
    if compiled:
        compile_blocks(fast, backend=aot_eager)
    inputs = _inputs(cfg, chunks=2)
    want, got = _grads(plain, inputs), _grads(fast, inputs)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n
