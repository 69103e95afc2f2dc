"""Apply a video encoder or decoder tile by tile over (T, H, W), blending overlapping tiles linearly.

Tiles have one size, spread evenly so the last one ends at the border rather than being cut short: a model
with learned position embeddings always sees its tile shape. Each output tile is weighted by a ramp
that rises across the overlap with its predecessor and falls across the overlap with its successor; the sum is
normalised by the summed weights, so where two tiles overlap the weights add up to one. A margin (the model's
halo: how far padding at a tile edge reaches into its output) gets weight zero where a neighbour covers it, so
a model whose outputs depend only on nearby inputs is reproduced exactly when overlaps exceed twice the margin.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch


def tile_starts(size: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """Start offsets of tiles of length `tile` covering [0, size), spread evenly from 0 to size - tile, no
    further apart than `stride`; starts are multiples of `align`."""
    if size <= tile:
        return [0]
    stride = max(align, stride // align * align)
    last = size - tile
    if last % align:  # size not a multiple of align: the caller pads, so this is a usage error
        raise ValueError(f"size {size} is not covered by tiles of {tile} aligned to {align}")
    gaps = -(-last // stride)
    return [(i * last // gaps) // align * align for i in range(gaps + 1)]


def _ramp(length: int, overlap_before: int, overlap_after: int, margin: int) -> torch.Tensor:
    """Rising from 0 to 1 across the first overlap, falling across the last; `margin` samples at a covered
    edge get 0. Neighbours' ramps over a shared overlap add up to one."""
    i = torch.arange(length, dtype=torch.float64) + 0.5
    w = torch.ones(length, dtype=torch.float64)
    for overlap, position in ((overlap_before, i), (overlap_after, length - i)):
        if overlap > 0:
            m = max(min(margin, (overlap - 1) // 2), 0)
            w = torch.minimum(w, ((position - m) / (overlap - 2 * m)).clamp(0.0, 1.0))
    return w


def _dim_weights(starts: list[int], tile_out: int, margin: int) -> list[torch.Tensor]:
    ramps = []
    for k, start in enumerate(starts):
        before = starts[k - 1] + tile_out - start if k > 0 else 0
        after = start + tile_out - starts[k + 1] if k + 1 < len(starts) else 0
        ramps.append(_ramp(tile_out, max(before, 0), max(after, 0), margin))
    return ramps


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: Sequence[int],
                stride: Sequence[int], align: Sequence[int] = (1, 1, 1), up: Sequence[int] = (1, 1, 1),
                down: Sequence[int] = (1, 1, 1), margin: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """fn maps x[:, :, t0:t1, h0:h1, w0:w1] ([B, C, t, h, w]) to [B, C', t*up/down, h*up/down, w*up/down].

    tile/stride/align are in input units per dimension (T, H, W); up/down give the output/input size ratio;
    margin is in output units."""
    sizes = x.shape[2:]
    tiles = [min(t, s) for t, s in zip(tile, sizes)]
    starts = [tile_starts(s, t, st, a) for s, t, st, a in zip(sizes, tiles, stride, align)]
    if all(len(s) == 1 for s in starts):
        return fn(x)

    def out_len(n: int, d: int) -> int:
        if n * up[d] % down[d]:
            raise ValueError(f"tile or offset {n} in dim {d} does not map to whole output samples")
        return n * up[d] // down[d]

    out_tiles = [out_len(t, d) for d, t in enumerate(tiles)]
    out_starts = [[out_len(s, d) for s in ss] for d, ss in enumerate(starts)]
    weights = [_dim_weights(ss, t, m) for ss, t, m in zip(out_starts, out_tiles, margin)]
    out = None
    for (i, t0), (j, h0), (k, w0) in itertools.product(*(list(enumerate(s)) for s in starts)):
        piece = fn(x[:, :, t0:t0 + tiles[0], h0:h0 + tiles[1], w0:w0 + tiles[2]])
        if tuple(piece.shape[2:]) != tuple(out_tiles):
            raise ValueError(f"tile function returned {tuple(piece.shape[2:])}, expected {tuple(out_tiles)}")
        if out is None:
            shape = [out_len(s, d) for d, s in enumerate(sizes)]
            out = torch.zeros(piece.shape[0], piece.shape[1], *shape, dtype=torch.float32, device=piece.device)
            norm = torch.zeros(*shape, dtype=torch.float32, device=piece.device)
        w = (weights[0][i][:, None, None] * weights[1][j][None, :, None] * weights[2][k][None, None, :])
        w = w.to(torch.float32).to(piece.device)
        ot, oh, ow = out_starts[0][i], out_starts[1][j], out_starts[2][k]
        region = (slice(ot, ot + out_tiles[0]), slice(oh, oh + out_tiles[1]), slice(ow, ow + out_tiles[2]))
        out[(slice(None), slice(None)) + region] += piece.float() * w
        norm[region] += w
    return out / norm  # float32
