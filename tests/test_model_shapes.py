"""Sizes, names and shapes of the DiT against the MAGI-1 release (magi1-reference.md)."""
import pytest
import torch

from magi_train.config import ConfigError, model_preset
from magi_train.model import build_dit, count_parameters


@pytest.mark.parametrize("name,billions", [("4.5B", 4.46), ("24B", 23.90)])
def test_parameter_counts_on_meta(name, billions):
    model = build_dit(model_preset(name), device="meta")
    assert round(count_parameters(model) / 1e9, 2) == billions


# (24B shape, 4.5B shape) per block key, from the reference document
BLOCK_SHAPES = {
    "ada_modulate_layer.proj.0.weight": ((12288, 1536), (6144, 768)),
    "ada_modulate_layer.proj.0.bias": ((12288,), (6144,)),
    "self_attention.linear_qkv.layer_norm.weight": ((6144,), (3072,)),
    "self_attention.linear_qkv.layer_norm.bias": ((6144,), (3072,)),
    "self_attention.linear_qkv.q.weight": ((6144, 6144), (3072, 3072)),
    "self_attention.linear_qkv.qx.weight": ((6144, 6144), (3072, 3072)),
    "self_attention.linear_qkv.k.weight": ((1024, 6144), (1024, 3072)),
    "self_attention.linear_qkv.v.weight": ((1024, 6144), (1024, 3072)),
    "self_attention.linear_kv_xattn.weight": ((2048, 6144), (2048, 3072)),
    "self_attention.linear_proj.weight": ((6144, 12288), (3072, 6144)),
    "self_attention.q_layernorm.weight": ((128,), (128,)),
    "self_attention.q_layernorm.bias": ((128,), (128,)),
    "self_attention.k_layernorm.weight": ((128,), (128,)),
    "self_attention.k_layernorm.bias": ((128,), (128,)),
    "self_attention.q_layernorm_xattn.weight": ((128,), (128,)),
    "self_attention.q_layernorm_xattn.bias": ((128,), (128,)),
    "self_attention.k_layernorm_xattn.weight": ((128,), (128,)),
    "self_attention.k_layernorm_xattn.bias": ((128,), (128,)),
    "self_attn_post_norm.weight": ((6144,), (3072,)),
    "self_attn_post_norm.bias": ((6144,), (3072,)),
    "mlp.layer_norm.weight": ((6144,), (3072,)),
    "mlp.layer_norm.bias": ((6144,), (3072,)),
    "mlp.linear_fc1.weight": ((32768, 6144), (12288, 3072)),
    "mlp.linear_fc2.weight": ((6144, 16384), (3072, 12288)),
    "mlp_post_norm.weight": ((6144,), (3072,)),
    "mlp_post_norm.bias": ((6144,), (3072,)),
}


@pytest.mark.parametrize("name,col,layers,D,in_ch", [("24B", 0, 48, 6144, 32), ("4.5B", 1, 34, 3072, 16)])
def test_state_dict_names_and_shapes(name, col, layers, D, in_ch):
    sd = build_dit(model_preset(name), device="meta").state_dict()
    expected = {}
    for i in range(layers):
        for k, shapes in BLOCK_SHAPES.items():
            expected[f"videodit_blocks.layers.{i}.{k}"] = shapes[col]
    expected.update({
        "x_embedder.weight": (D, in_ch, 1, 2, 2),
        "t_embedder.mlp.0.weight": (D // 4, 256), "t_embedder.mlp.0.bias": (D // 4,),
        "t_embedder.mlp.2.weight": (D // 4, D // 4), "t_embedder.mlp.2.bias": (D // 4,),
        "y_embedder.y_proj_xattn.0.weight": (D, 4096), "y_embedder.y_proj_xattn.0.bias": (D,),
        "y_embedder.y_proj_adaln.0.weight": (D // 4, 4096), "y_embedder.y_proj_adaln.0.bias": (D // 4,),
        "y_embedder.null_caption_embedding": (800, 4096),
        "rope.bands": (16,),
        "videodit_blocks.final_layernorm.weight": (D,), "videodit_blocks.final_layernorm.bias": (D,),
        "final_linear.linear.weight": (4 * in_ch, D),
    })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_tiny_forward_shapes_and_dtypes(tiny_cfg):
    model = build_dit(tiny_cfg)
    x = torch.randn(2, 16, 12, 8, 6)
    out = model(x, torch.rand(2, 2), torch.randn(2, 5, 64))
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("B", [1, 2])
def test_every_layer_gets_token_major_hidden_states(tiny_cfg, B):
    """The residual stream is [S, B, D] rows in memory from the embedding on (a feature-major view made each
    layer's LayerNorms copy it, docs/benchmarks.md issue 19)."""
    model = build_dit(tiny_cfg)
    seen = []
    for layer in model.videodit_blocks.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        layer.mlp.layer_norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    model(torch.randn(B, 16, 12, 8, 6), torch.rand(B, 2), torch.randn(B, 5, 64))
    assert len(seen) == 2 * len(model.videodit_blocks.layers) and all(seen)


def test_half_channel_vae_and_rescale():
    cfg = model_preset("tiny", in_channels=32, out_channels=32, half_channel_vae=True, x_rescale_factor=0.1)
    model = build_dit(cfg)
    torch.nn.init.normal_(model.final_linear.linear.weight, std=0.1)
    x = torch.randn(1, 16, 6, 4, 4)
    out = model(x, torch.rand(1, 1), torch.randn(1, 3, 64))
    assert out.shape == (1, 16, 6, 4, 4)
    assert torch.isfinite(out).all() and out.abs().mean() > 0


def test_bf16_blocks_keep_fp32_islands():
    model = build_dit(model_preset("tiny", params_dtype="bfloat16"))
    assert model.videodit_blocks.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    for name in ("x_embedder.weight", "t_embedder.mlp.0.weight", "y_embedder.null_caption_embedding", "rope.bands",
                 "final_linear.linear.weight"):
        assert model.get_parameter(name).dtype == torch.float32
    out = model(torch.randn(1, 16, 6, 4, 4), torch.rand(1, 1), torch.randn(1, 3, 64))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("field,value,fragment", [
    ("num_query_groups", 3, "model.num_query_groups"),
    ("attention_backend", "magic", "accepted values are"),
    ("kv_channels", 36, "model.kv_channels"),
    ("hidden_size", 0, "model.hidden_size"),
])
def test_bad_model_config_is_one_line(field, value, fragment):
    with pytest.raises(ConfigError) as e:
        model_preset("tiny", **{field: value})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match="model.hiden_size: unknown key"):
        model_preset("tiny", hiden_size=3)


def test_whole_chunks_required(tiny_cfg):
    model = build_dit(tiny_cfg)
    with pytest.raises(ValueError, match="chunk_width"):
        model(torch.randn(1, 16, 7, 4, 4), torch.rand(1, 1), torch.randn(1, 3, 64))
