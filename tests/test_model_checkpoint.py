"""MAGI-1 checkpoint format: strict round trips, sharded index, TP-8 linear_proj layout, fp8 format."""
import json

import pytest
import torch
from einops import rearrange

from conftest import randomize_
from magi_train.config import model_preset
from magi_train.model import build_dit
from magi_train.checkpoint.magi_format import (CheckpointMismatch, load_magi_checkpoint, quantize_to_magi_fp8,
                                            read_safetensors, save_magi_checkpoint, write_safetensors)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_(build_dit(model_preset("tiny", **kw)), seed=seed)


def _inputs(B=1, n=2):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, 16, 6 * n, 4, 4, generator=g), torch.rand(B, n, generator=g),
            torch.randn(B, 5, 64, generator=g))


def test_round_trip_is_strict_and_bit_exact(tmp_path):
    a = _model(0)
    save_magi_checkpoint(a, tmp_path / "ckpt" / "inference_weight")
    b = _model(1)
    where = load_magi_checkpoint(b, tmp_path / "ckpt")
    assert where.name == "inference_weight"
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k


def test_sharded_index_loads(tmp_path):
    a = _model(0)
    out = save_magi_checkpoint(a, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    b = build_dit(model_preset("tiny"), device="meta")  # load with assign=True onto a meta model
    load_magi_checkpoint(b, out)
    x, t, c = _inputs()
    assert torch.equal(a(x, t, c), b(x, t, c))


def test_linear_proj_is_stored_tp8_interleaved(tmp_path):
    model = _model(0)
    save_magi_checkpoint(model, tmp_path / "w")
    stored = read_safetensors(tmp_path / "w")
    ours = model.videodit_blocks.layers[0].self_attention.linear_proj.weight
    magi = stored["videodit_blocks.layers.0.self_attention.linear_proj.weight"]
    core, cross = torch.randn(3, 128), torch.randn(3, 128)
    # MAGI-1: concat then "(n hn hd) -> (hn n hd)" with hn=8 before the projection
    magi_in = rearrange(torch.cat([core, cross], -1), "s (n hn hd) -> s (hn n hd)", n=2, hn=8)
    assert torch.allclose(magi_in @ magi.t(), torch.cat([core, cross], -1) @ ours.t(), atol=1e-5)


@pytest.mark.parametrize("corrupt,fragment", [
    ("drop", "missing tensor videodit_blocks.layers.1.mlp.linear_fc2.weight"),
    ("extra", "unexpected tensor extra.weight"),
    ("shape", "videodit_blocks.layers.0.mlp.linear_fc1.weight has shape (10, 128), model expects (512, 128)"),
])
def test_mismatch_names_key_and_shapes(tmp_path, corrupt, fragment):
    sd = read_safetensors(save_magi_checkpoint(_model(0), tmp_path / "w"))
    if corrupt == "drop":
        del sd["videodit_blocks.layers.1.mlp.linear_fc2.weight"]
    elif corrupt == "extra":
        sd["extra.weight"] = torch.zeros(2)
    else:
        sd["videodit_blocks.layers.0.mlp.linear_fc1.weight"] = torch.zeros(10, 128)
    write_safetensors(sd, tmp_path / "bad")
    with pytest.raises(CheckpointMismatch) as e:
        load_magi_checkpoint(_model(1), tmp_path / "bad")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_magi_checkpoint(_model(0), tmp_path / "nowhere")


@torch.no_grad()
def test_fp8_checkpoint_loads_and_stays_close(tmp_path):
    """3 layers: the middle one is quantised (MAGI-1 keeps first and last in high precision)."""
    model = _model(0, num_layers=3)
    for p in model.parameters():  # realistic scale: trained weights are ~0.02, not 0.1
        p.mul_(0.3)
    fp8_state = quantize_to_magi_fp8(model)
    assert fp8_state["videodit_blocks.layers.1.self_attention.linear_qkv.q.weight"].dtype == torch.float8_e4m3fn
    assert fp8_state["videodit_blocks.layers.1.mlp.linear_fc2.smooth_scale"].shape == (1, 512)
    assert fp8_state["videodit_blocks.layers.0.mlp.linear_fc1.weight"].dtype == torch.float32
    write_safetensors(fp8_state, tmp_path / "ckpt" / "inference_weight.fp8")
    q = build_dit(model_preset("tiny", num_layers=3))
    load_magi_checkpoint(q, tmp_path / "ckpt", fp8=True)
    x, t, c = _inputs(n=2)
    ref, out = model(x, t, c), q(x, t, c)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # stated bound: e4m3 weights+activations, 5% relative L2 on the velocity
    assert rel > 0  # it really ran in fp8
