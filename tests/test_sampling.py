"""Time grids, shortcut schedules, step-size factors, per-chunk Euler and MAGI-1's CFG combination."""
import pytest
import torch

from magi_train.diffusion.sampling import (base_time_grid, blend_prev_chunks, cfg_bins, cfg_scales, combine_cfg,
                                           distill_dt_factors, euler_step, parse_shortcut_mode, shift_time,
                                           shortcut_applies, time_grid)

T_RANGE = [0.0, 0.0217, 0.1, 0.3, 0.999]
PREV = [1.5, 1.5, 1.5, 1.0, 1.0]
TEXT = [7.5, 7.5, 7.5, 0.0, 0.0]


def test_time_grid_is_square_then_shift_3():
    t = time_grid(64)
    base = torch.linspace(0, 1, 65) ** 2
    expected = (base / 3) / (1 - (2 / 3) * base)
    torch.testing.assert_close(t, expected)
    assert t[0] == 0 and abs(float(t[-1]) - 1) < 1e-6 and bool((t[1:] > t[:-1]).all())
    # 4 steps land on MAGI-1's CFG bin edges
    torch.testing.assert_close(time_grid(4), torch.tensor([0.0, 0.0217, 0.1, 0.3, 1.0]), atol=1e-4, rtol=0)


def test_shift_and_schedules():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert bool((shift_time(t, 3.0) <= t + 1e-7).all())  # more steps spent near noise (t=0)
    torch.testing.assert_close(time_grid(10, schedule="square"), t ** 2)
    torch.testing.assert_close(time_grid(10, schedule="identity"), t)
    with pytest.raises(ValueError, match="time_schedule"):
        time_grid(10, schedule="cosine")


def test_shortcut_grid_8_16_16():
    g = base_time_grid(12, "8,16,16")
    steps = (g[1:] - g[:-1]).tolist()
    assert steps == [1 / 8, 1 / 16, 1 / 16] * 4
    assert (base_time_grid(12, "16,16,8")[1:] - base_time_grid(12, "16,16,8")[:-1]).tolist() == [1 / 16, 1 / 16, 1 / 8] * 4
    # MAGI-1 uses the pattern only when num_steps is its step count
    assert shortcut_applies(12, "8,16,16") and not shortcut_applies(16, "8,16,16")
    torch.testing.assert_close(base_time_grid(16, "8,16,16"), torch.linspace(0, 1, 17))
    torch.testing.assert_close(distill_dt_factors(12, "8,16,16"), torch.tensor([4.0, 8.0, 8.0] * 4))
    torch.testing.assert_close(distill_dt_factors(64), torch.full((64,), 32.0))  # num_steps / 4 * 2
    with pytest.raises(ValueError, match="shortcut_mode"):
        parse_shortcut_mode("8,16")   # 1/8 + 1/16 = 3/16 does not divide [0, 1]
    with pytest.raises(ValueError, match="shortcut_mode"):
        parse_shortcut_mode("a,b")


def test_euler_step_moves_each_chunk_by_its_own_dt():
    x = torch.zeros(1, 2, 6, 2, 2)
    v = torch.ones_like(x)
    out = euler_step(x, v, torch.tensor([0.0, 0.5, 0.9]), torch.tensor([0.1, 0.7, 1.0]), chunk_width=2)
    for c, dt in enumerate([0.1, 0.2, 0.1]):
        torch.testing.assert_close(out[:, :, 2 * c:2 * c + 2], torch.full((1, 2, 2, 2, 2), dt))
    with pytest.raises(ValueError):
        euler_step(x, v, torch.zeros(2), torch.ones(2), chunk_width=2)


@pytest.mark.parametrize("t,bin_", [(0.0, 0), (0.0216, 0), (0.0217, 1), (0.05, 1), (0.1, 2), (0.29, 2), (0.3, 3),
                                    (0.9, 3), (0.9999, 4), (1.0, 4)])
def test_cfg_bins(t, bin_):
    assert int(cfg_bins(torch.tensor([t]), T_RANGE)[0]) == bin_


def test_cfg_combination_equals_hand_computation_in_every_bin():
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([0.01, 0.05, 0.2, 0.5, 0.9999])   # one chunk per bin
    cw = 2
    vt, vc, vu = (torch.randn(1, 3, 5 * cw, 2, 2, generator=g) for _ in range(3))
    sp, st = cfg_scales(ts, T_RANGE, PREV, TEXT)
    assert sp.tolist() == PREV and st.tolist() == TEXT
    out = combine_cfg(vt, vc, vu, sp, st, cw)
    for c in range(5):
        s = slice(c * cw, (c + 1) * cw)
        hand = vu[:, :, s] + PREV[c] * (vc[:, :, s] - vu[:, :, s]) + TEXT[c] * (vt[:, :, s] - vc[:, :, s])
        torch.testing.assert_close(out[:, :, s], hand)
    # late bins: guidance reduces to the with-history, null-prompt velocity
    torch.testing.assert_close(out[:, :, 3 * cw:], vc[:, :, 3 * cw:])
    # text-only CFG (cfg_number 2)
    out2 = combine_cfg(vt, vc, None, sp, st, cw)
    torch.testing.assert_close(out2[:, :, :cw], vc[:, :, :cw] + 7.5 * (vt[:, :, :cw] - vc[:, :, :cw]))


def test_blend_prev_chunks():
    a, b = torch.full((2,), 2.0), torch.full((2,), 1.0)
    torch.testing.assert_close(blend_prev_chunks(a, b, 0.7), torch.full((2,), 1.7))
