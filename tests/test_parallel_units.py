"""Single-process pieces of magi_train.parallel: TP shard layouts, stage cuts, GQA head picking, the
world-size-1 path, lazy MAGI-1 reading, the memory tracker."""
import pytest
import torch

from magi_train.config import model_preset
from magi_train.config.parallel_config import ParallelConfig
from magi_train.model import build_dit
from magi_train.checkpoint.magi_format import save_magi_checkpoint
from magi_train.parallel.context_parallel import _kv_head_index
from magi_train.parallel.env import ParallelEnv, init_parallel
from magi_train.parallel.pipeline import split_layers
from magi_train.parallel.state_dict_adapter import full_shape, param_role, shard_tensor, tp_layout


@pytest.fixture(scope="module")
def gated_state():
    cfg = model_preset("tiny", gated_linear_unit=True, chunk_width=2)
    torch.manual_seed(0)
    return cfg, {k: v + torch.randn_like(v) for k, v in build_dit(cfg).state_dict().items()}


@pytest.mark.parametrize("tp", [2, 4])   # tiny has 2 KV heads: tp=4 replicates each on 2 ranks
def test_tp_shards_reassemble_the_full_tensor(gated_state, tp):
    cfg, state = gated_state
    sharded = 0
    for name, full in state.items():
        out = torch.full_like(full, float("nan"))
        for r in range(tp):
            lay = tp_layout(name, cfg, tp, r)
            local = shard_tensor(name, full, cfg, tp, r)
            if lay is None:
                assert local is full
                out = full
                continue
            sharded += 1
            assert full_shape(name, local.shape, cfg, tp) == tuple(full.shape)
            out.index_copy_(lay.dim, torch.tensor(lay.index), local)
        torch.testing.assert_close(out, full, rtol=0, atol=0)
    assert sharded == tp * 8 * cfg.num_layers  # q, qx, k, v, kv_xattn, proj, fc1, fc2 of every layer


def test_tp_layouts_pair_swiglu_halves_and_proj_heads(gated_state):
    cfg, _ = gated_state
    f, q, hd = cfg.ffn_hidden_size, cfg.q_dim, cfg.kv_channels
    fc1 = tp_layout("videodit_blocks.layers.0.mlp.linear_fc1.weight", cfg, 2, 1)
    assert fc1.index == tuple(range(f // 2, f)) + tuple(range(f + f // 2, 2 * f))   # gate slice 1 | up slice 1
    proj = tp_layout("videodit_blocks.layers.0.self_attention.linear_proj.weight", cfg, 2, 1)
    assert proj.dim == 1 and proj.index == tuple(range(q // 2, q)) + tuple(range(q + q // 2, 2 * q))
    k = tp_layout("videodit_blocks.layers.0.self_attention.linear_qkv.k.weight", cfg, 4, 3)
    assert k.index == tuple(range(hd, 2 * hd)) and k.replicas == 2                  # rank 3 -> KV head 1
    kvx = tp_layout("videodit_blocks.layers.0.self_attention.linear_kv_xattn.weight", cfg, 4, 2)
    assert kvx.index == tuple(range(2 * hd, 4 * hd))                                # [k|v] of KV head 1
    assert param_role("videodit_blocks.layers.0.self_attention.q_layernorm.weight") is None
    assert param_role("y_embedder.y_proj_xattn.0.weight") is None


def test_split_layers_is_contiguous_and_balanced():
    assert [list(r) for r in split_layers(4, 2)] == [[0, 1], [2, 3]]
    r = split_layers(34, 4)
    assert [len(x) for x in r] == [8, 9, 9, 8] and r[0].start == 0 and r[-1].stop == 34
    assert sum(len(x) for x in split_layers(48, 16)) == 48
    with pytest.raises(ValueError, match="parallel.pp"):
        split_layers(2, 4)


def test_kv_heads_of_a_cp_rank():
    assert _kv_head_index(4, 2, 2, 1) == [1]               # 2 q heads per rank, one whole GQA group
    assert _kv_head_index(6, 1, 2, 0) == [0]               # 24B tp=8: 6 q heads share 1 KV head
    assert _kv_head_index(8, 4, 8, 5) == [2]
    assert _kv_head_index(6, 3, 3, 1) == [1]
    assert _kv_head_index(4, 2, 4, 1) == [0]


def test_world_size_one_needs_no_process_group():
    env = init_parallel(ParallelConfig())
    assert env.world_size == 1 and not env.distributed and env.tp_group is None


def test_single_process_layout_equals_the_model(gated_state):
    from magi_train.parallel import forward_backward, parallelize
    from magi_train.parallel.equivalence import loss_fn, make_microbatches
    from magi_train.grad_accumulation import accumulate_gradients
    import contextlib

    def reference_step(model, mbs, loss_fn):
        return accumulate_gradients(model, mbs, loss_fn, None, lambda last: contextlib.nullcontext())

    cfg, state = gated_state
    model = parallelize(cfg, env=ParallelEnv(pcfg=ParallelConfig(dp=1)), full_state=state)
    ref = build_dit(cfg)
    ref.load_state_dict(state)
    mbs = make_microbatches(cfg, 2, 2)
    loss = forward_backward(model, mbs, loss_fn)
    ref_loss = reference_step(ref, mbs, loss_fn)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    # the layout's global norm and clipping (foreach norms) are torch's
    from magi_train.parallel.grads import clip_grad_norm_

    max_norm = 0.5 * float(torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()]))
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
    assert clip_grad_norm_(model.magi_parallel, max_norm) == pytest.approx(want, rel=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_magi_getter_reads_one_tensor_at_a_time(tmp_path, gated_state):
    from magi_train.checkpoint.release_reader import magi_tensor_getter

    cfg, state = gated_state
    save_magi_checkpoint(state, tmp_path / "ckpt", max_shard_bytes=200_000)    # several shards + index
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    get = magi_tensor_getter(tmp_path / "ckpt")
    for name, t in state.items():
        torch.testing.assert_close(get(name), t, rtol=0, atol=0)               # MAGI-1 proj layout undone


def test_live_bytes_counts_views_once_and_frees():
    from magi_train.parallel.memory_tracker import LiveBytes

    with LiveBytes() as mt:
        a = torch.empty(1000, 250)       # 1 MB
        b = a.view(-1)[:10]               # a view: no new bytes
        assert mt.current == 1_000_000
        c = a * 2
        assert mt.peak == 2_000_000
        del a, b
        assert mt.current == 1_000_000
        del c
        assert mt.current == 0
