"""The hand-written Triton islands (CUDA, compiled islands on) against the eager islands and nn.LayerNorm."""
import pytest
import torch

from conftest import random_captions, tiny_infer_dit

from magi_train.model import fused_ops, triton_islands

GPU = torch.cuda.is_available() and triton_islands.available()


def test_cpu_inputs_take_the_eager_island_and_no_norm_comes_back():
    x, res = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    gates = torch.randn(2, 3, 16)[..., 8:]
    y, normed = fused_ops.gated_residual(x, res, gates, torch.arange(3).repeat_interleave(2), torch.ones(8),
                                         torch.zeros(8), 1e-6, (torch.ones(8), torch.zeros(8), 1e-5))
    assert normed is None and not triton_islands.supports_gated_residual(x, res, gates)
    assert not triton_islands.supports_norm_rope(x.view(6, 2, 2, 4))
    assert y.shape == (6, 2, 8)


@pytest.mark.skipif(not GPU, reason="needs CUDA and Triton")
@pytest.mark.parametrize("D,B", [(3072, 3), (96, 1), (6144, 2)])
def test_kernel_equals_the_eager_island_and_layer_norm(D, B):
    g = torch.Generator(device="cuda").manual_seed(D)
    n, T = 3, 7
    S = n * T
    x = torch.randn(S, B, D, device="cuda", generator=g).bfloat16()
    res = torch.randn(S, B, D, device="cuda", generator=g).bfloat16()
    gates = torch.randn(B, n, 2 * D, device="cuda", generator=g).bfloat16()[..., D:]  # the block's view
    tc = torch.arange(n, device="cuda").repeat_interleave(T)
    w, b = (torch.randn(D, device="cuda", generator=g).bfloat16() for _ in range(2))
    ln = torch.nn.LayerNorm(D, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ln.weight.normal_(generator=g), ln.bias.normal_(generator=g)
        y, normed = triton_islands.gated_residual(x, res, gates, tc, w, b, 1e-6, (ln.weight, ln.bias, ln.eps))
        want = fused_ops._gated_residual(x, res, gates[:, tc].transpose(0, 1), w, b, 1e-6)
        assert y.dtype == torch.bfloat16 and normed.dtype == torch.bfloat16
        # the same fp32 arithmetic up to the order of the row sums: at most one bf16 step apart
        torch.testing.assert_close(y, want, rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(normed, ln(y), rtol=1.6e-2, atol=1.6e-2)
        y_only, none = triton_islands.gated_residual(x, res, gates, tc, w, b, 1e-6)
        assert none is None  # autotune may pick other warps without the norm: the sums order differs
        torch.testing.assert_close(y_only, y, rtol=8e-3, atol=8e-3)


@pytest.mark.skipif(not GPU, reason="needs CUDA and Triton")
@pytest.mark.parametrize("heads,head_dim,rope", [(24, 128, True), (8, 128, True), (3, 64, False)])
def test_norm_rope_kernel_equals_the_eager_island(heads, head_dim, rope):
    """q/k: a strided [S, B, heads, head_dim] view of the fused projection, normed and rotated (the 3D RoPE's
    first 3/4 of each head); qx/kx: norm only, any leading dims."""
    from magi_train.model.rope import LearnableRope3D

    g = torch.Generator(device="cuda").manual_seed(heads)
    S, B = 2 * 3 * 4, 2
    proj = torch.randn(S, B, 3 * heads * head_dim, device="cuda", generator=g).bfloat16()
    x = proj[..., heads * head_dim: 2 * heads * head_dim].unflatten(-1, (heads, head_dim))
    w, b = (torch.randn(head_dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    cos = sin = None
    if rope:
        cos, sin = LearnableRope3D(head_dim).cuda()(5, 2, 3, 4)
    with torch.no_grad():
        got = triton_islands.norm_rope(x, w, b, 1e-6, cos, sin)
        want = (fused_ops._norm_rope(x, w, b, 1e-6, cos, sin, torch.bfloat16) if rope
                else fused_ops._norm(x, w, b, 1e-6, torch.bfloat16))
        assert got.shape == x.shape and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=8e-3, atol=8e-3)
        kx = torch.randn(B, 3, 5, heads, 2 * head_dim, device="cuda", generator=g)[..., :head_dim]
        torch.testing.assert_close(triton_islands.norm_rope(kx, w, b, 1e-6, out_dtype=torch.bfloat16),
                                   fused_ops._norm(kx, w, b, 1e-6, torch.bfloat16), rtol=8e-3, atol=8e-3)


@pytest.mark.skipif(not GPU, reason="needs CUDA and Triton")
def test_model_with_compiled_islands_on_cuda_matches_eager():
    """Every layer's gated residuals (and the MLP norm) through the kernel: the tiny model's output as eager's."""
    model = tiny_infer_dit(2)
    model.videodit_blocks.to(torch.bfloat16)  # as magi_infer builds it: blocks bf16, embedders fp32
    model.cuda()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3 * 2, 4, 4, generator=g).cuda()
    t = torch.rand(2, 3, generator=g).cuda()
    caption = random_captions(model, 3, batch=2)[0].cuda()
    with torch.no_grad():
        plain = model(x, t, caption).float()
        try:
            fused_ops.use_compiled(True)
            fused = model(x, t, caption).float()
        finally:
            fused_ops.use_compiled(False)
    assert plain.abs().max() > 0.1
    assert (fused - plain).norm() / plain.norm() < 2e-2
