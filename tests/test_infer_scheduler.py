"""The chunk scheduler: staggering, step counts, clean-chunk passes and look-back limits (pure, no model)."""
from collections import defaultdict

import pytest

from magi_infer.scheduler import lookbacks, oldest_visible, prefix_lookback, window_schedule


def _stage_windows(sched):
    return [(ws.chunks[0], ws.chunks[-1] + 1) for ws in sched if ws.substep == 0]


@pytest.mark.parametrize("num_chunks,window,steps,first", [(8, 4, 8, 0), (8, 1, 4, 0), (5, 4, 12, 2), (2, 4, 8, 0),
                                                           (3, 3, 6, 0)])
def test_every_chunk_gets_num_steps_updates_in_order(num_chunks, window, steps, first):
    sched = window_schedule(num_chunks, window, steps, first)
    seen = defaultdict(list)
    for ws in sched:
        assert list(ws.chunks) == sorted(ws.chunks) and len(ws.chunks) <= window
        # staggered: older chunks are further along
        assert all(a > b for a, b in zip(ws.steps, ws.steps[1:]))
        for c, s in zip(ws.chunks, ws.steps):
            seen[c].append(s)
    assert sorted(seen) == list(range(first, num_chunks))
    for c, s in seen.items():
        assert s == list(range(steps)), f"chunk {c}"
    assert len(sched) == steps // window * (num_chunks - first + window - 1)   # MAGI-1's forward count


def test_windows_match_magi1_examples():
    # MAGI-1 video_generate.py examples: clip_start / clip_end per stage
    assert _stage_windows(window_schedule(8, 4, 8)) == list(zip([0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
                                                                [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8]))
    assert _stage_windows(window_schedule(8, 4, 8, first_chunk=2)) == list(zip([2, 2, 2, 2, 3, 4, 5, 6, 7],
                                                                               [3, 4, 5, 6, 7, 8, 8, 8, 8]))
    assert _stage_windows(window_schedule(8, 1, 4)) == [(c, c + 1) for c in range(8)]


def test_clean_chunk_rides_in_front_once_after_it_finishes():
    sched = window_schedule(6, 3, 6, first_chunk=1)
    finished_at = {ws.finishing: i for i, ws in enumerate(sched) if ws.finishing is not None}
    assert sorted(finished_at) == [1, 2, 3, 4, 5]
    cleans = [(i, ws.clean_chunk) for i, ws in enumerate(sched) if ws.clean_chunk is not None]
    # each finished chunk but the last is re-run exactly once, in the forward right after it finished
    assert [c for _, c in cleans] == [1, 2, 3, 4]
    for i, c in cleans:
        assert finished_at[c] == i - 1 and sched[i].substep == 0 and sched[i].chunks[0] == c + 1
        assert sched[i].input_chunks == (c,) + sched[i].chunks


def test_lookbacks_follow_denoising_quarters():
    sched = window_schedule(8, 4, 8)
    ws = next(w for w in sched if w.clean_chunk is not None)      # stage 4: chunks 1..4, chunk 0 clean
    assert ws.steps == (6, 4, 2, 0)
    assert lookbacks(ws, 8, [5, 4, 3, 2], 1) == [1, 2, 3, 4, 5]   # clean chunk first
    assert lookbacks(ws, 8, [5, 4, 3, 2], -1) == [2, 2, 3, 4, 5]  # -1: last noise2clean value
    assert lookbacks(ws, 8, [], 1) is None
    # MAGI-1's ranges keep every chunk of a stage looking back to the same oldest chunk
    assert oldest_visible(ws, lookbacks(ws, 8, [5, 4, 3, 2], 1)) == 0
    assert prefix_lookback([5, 4, 3, 2], 1) == 1 and prefix_lookback([5, 4, 3, 2], -1) == 2
    assert prefix_lookback([], -1) == 8
    with pytest.raises(ValueError, match="noise2clean_kvrange"):
        lookbacks(ws, 8, [5, 4, 3], 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps"):
        window_schedule(4, 3, 8)
    with pytest.raises(ValueError, match="window_size"):
        window_schedule(4, 0, 8)
    with pytest.raises(ValueError, match="nothing to generate"):
        window_schedule(2, 1, 4, first_chunk=2)
