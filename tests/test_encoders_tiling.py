"""Tiling: coverage of tile starts, blend weights that sum to one, exact reproduction of local functions."""
import pytest
import torch
import torch.nn.functional as F

from magi_train.encoders.tiling import _dim_weights, tile_starts, tiled_apply


@pytest.mark.parametrize("size,tile,stride,align", [(100, 32, 24, 1), (96, 32, 24, 8), (33, 32, 16, 1), (8, 32, 24, 8)])
def test_tile_starts_cover_and_align(size, tile, stride, align):
    starts = tile_starts(size, tile, stride, align)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
        assert s % align == 0 and s + min(tile, size) <= size
    assert covered.all() and starts == sorted(set(starts))


def test_blend_weights_partition_unity():
    starts = tile_starts(100, 32, 20)
    for margin in (0, 2):
        total = torch.zeros(100, dtype=torch.float64)
        for s, w in zip(starts, _dim_weights(starts, 32, margin)):
            total[s:s + 32] += w
        torch.testing.assert_close(total, torch.ones(100, dtype=torch.float64))


def test_local_functions_reproduced_exactly():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 6, 12, 16)
    upsample = lambda t: t.repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)  # noqa: E731
    torch.testing.assert_close(tiled_apply(z, upsample, (2, 6, 6), (1, 4, 4), up=(4, 8, 8)), upsample(z))
    video = torch.randn(1, 3, 24, 96, 128)
    pool = lambda t: F.avg_pool3d(t, (4, 8, 8))  # noqa: E731
    out = tiled_apply(video, pool, (8, 48, 48), (8, 32, 32), align=(4, 8, 8), down=(4, 8, 8))
    torch.testing.assert_close(out, pool(video))
    # a 3x3 conv (halo 1) is exact once the margin hides the padded tile edges
    weight = torch.randn(2, 3, 3, 3)
    conv = lambda t: torch.stack([F.conv2d(t[:, :, i], weight, padding=1) for i in range(t.shape[2])], 2)  # noqa
    image = torch.randn(1, 3, 1, 40, 40)
    torch.testing.assert_close(tiled_apply(image, conv, (1, 16, 16), (1, 10, 10), margin=(0, 1, 1)), conv(image))
    assert (tiled_apply(image, conv, (1, 16, 16), (1, 10, 10)) - conv(image)).abs().max() > 1e-3
