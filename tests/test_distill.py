"""Shortcut + CFG distillation (train.objective=shortcut_distill): step-size codes against the release's formulas,
the two-half-step target against explicit Euler half steps of the student, the teacher's guided velocity against
magi_infer's for the same inputs, and the config's one-line errors."""
import dataclasses

import pytest
import torch
from conftest import randomize_

from magi_infer.config import SamplerConfig
from magi_infer.guidance import WindowInput
from magi_infer.guidance import guided_velocity as infer_guided_velocity
from magi_infer.kv_cache import InferenceKVCache
from magi_train.config import ConfigError, FlowMatchingConfig, model_preset
from magi_train.config.distill_config import DistillConfig
from magi_train.diffusion import ChunkNoise, context_dropped, prepare_inputs
from magi_train.diffusion.sampling import base_time_grid, distill_dt_factors, time_grid
from magi_train.diffusion.shortcut import (base_position, budget_dt_code, snap_to_grid, step_times,
                                           two_half_step_target)
from magi_train.model import build_dit
from magi_train.objectives.guided_teacher import guided_velocity
from magi_train.objectives.shortcut_distill import ShortcutDistillObjective

pytestmark = pytest.mark.usefixtures("one_thread")
CW, HW, L = 2, (4, 4), 8


# ----------------------------------------------------------------------------- dt codes
def _release_dt_codes(num_steps: int, shortcut_mode: str = "8,16,16") -> list[float]:
    """MAGI-1 dit_model.py: num_steps / 4 * 2 for uniform grids; at 12 steps base_chunk_step 4 / interval * 2 with
    init_intervel's intervals ([2, 1, 1] per group for '8,16,16', [1, 1, 2] for '16,16,8')."""
    if num_steps == 12:
        group = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
        return [4 / i * 2 for i in group * 4]
    return [num_steps / 4 * 2] * num_steps


@pytest.mark.parametrize("num_steps", [8, 16, 32, 64])
def test_dt_codes_equal_the_release_for_uniform_budgets(num_steps):
    assert distill_dt_factors(num_steps, "8,16,16").tolist() == _release_dt_codes(num_steps)
    assert float(budget_dt_code(num_steps)) == _release_dt_codes(num_steps)[0]


@pytest.mark.parametrize("mode", ["8,16,16", "16,16,8"])
def test_dt_codes_of_the_12_step_shortcut_equal_the_release(mode):
    assert distill_dt_factors(12, mode).tolist() == _release_dt_codes(12, mode)


def test_training_steps_are_the_shortcut_steps_the_sampler_takes():
    """Each 12-step shortcut step (code c) starts on the grid of budget 2c and lands where one step of that
    budget lands: training at budgets 8 and 16 covers the steps magi_infer serves."""
    grid, codes = time_grid(12, 3.0, "sd3", "8,16,16"), distill_dt_factors(12, "8,16,16")
    for i in range(12):
        budget = torch.tensor([[2 * float(codes[i])]])
        t = grid[i].reshape(1, 1)
        assert torch.allclose(snap_to_grid(t, budget), t, atol=1e-6)
        assert torch.allclose(step_times(t, budget)[1], grid[i + 1].reshape(1, 1), atol=1e-6)
    u = base_time_grid(64)
    assert torch.allclose(base_position(time_grid(64)), u, atol=1e-5)


# ----------------------------------------------------------------------------- models and inputs
def _cfg(distill: bool):
    return model_preset("tiny", num_layers=2, chunk_width=CW, distill=distill, attention_backend="reference")


def _model(distill: bool, seed: int):
    torch.manual_seed(seed)
    return randomize_(build_dit(_cfg(distill)), std=0.05, seed=seed).eval()


def _inputs(B=2, n=3, seed=0):
    cfg = _cfg(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.latent_channels, n * CW, *HW, generator=g)
    caption = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, -2:] = False
    return x, caption, mask


# ----------------------------------------------------------------------------- two half steps
def _per_chunk(values, n_frames):
    return values.repeat_interleave(CW, dim=1)[:, None, :, None, None]


@torch.no_grad()
def test_two_half_step_target_equals_two_explicit_euler_half_steps():
    student = _model(True, seed=1)
    x, caption, mask = _inputs()
    t = torch.tensor([[0.9999, 0.4, 0.1], [0.6, 0.6, 0.02]])
    budget = torch.tensor([[8.0] * 3, [16.0] * 3])
    t = snap_to_grid(t, budget)
    t_mid, t_next = step_times(t, budget)
    code = budget_dt_code(2 * budget)

    def f(x_in, t_in):
        return student(x_in, t_in, caption, mask, None, code)

    target = two_half_step_target(f, x, t, t_mid, t_next, CW)
    # explicitly, chunk by chunk
    v1 = student(x, t, caption, mask, None, code)
    x_mid = x.clone()
    for k in range(3):
        sl = slice(k * CW, (k + 1) * CW)
        x_mid[:, :, sl] = x[:, :, sl] + v1[:, :, sl] * (t_mid[:, k] - t[:, k])[:, None, None, None, None]
    v2 = student(x_mid, t_mid, caption, mask, None, code)
    x_next = x_mid + v2 * _per_chunk(t_next - t_mid, x.shape[2])
    one_step = x + target * _per_chunk(t_next - t, x.shape[2])
    assert torch.allclose(one_step, x_next, atol=1e-6)
    assert (t_mid > t).all() and (t_next > t_mid).all()


# ----------------------------------------------------------------------------- teacher guidance
RELEASE = dict(cfg_t_range=[0.0, 0.0217, 0.1, 0.3, 0.999], prev_chunk_scales=[1.5, 1.5, 1.5, 1.0, 1.0],
               text_scales=[7.5, 7.5, 7.5, 0.0, 0.0])


def _ours(model, x, t, caption, mask, dropped, cfg_number=3):
    return guided_velocity(model, x, t, caption, mask, dropped, chunk_width=CW, cfg_number=cfg_number,
                           t_range=RELEASE["cfg_t_range"], prev_scales=RELEASE["prev_chunk_scales"],
                           text_scales=RELEASE["text_scales"])


@pytest.mark.parametrize("cfg_number", [3, 2])
@torch.no_grad()
def test_teacher_guided_velocity_equals_magi_infer_for_a_window(cfg_number):
    """A window of noisy chunks in every t bin, no history: the same inputs as magi_infer's guided_velocity."""
    teacher = _model(False, seed=2)
    x, caption, mask = _inputs(n=4)
    # one schedule for the whole batch, as inference runs it (magi_infer takes its CFG decisions from it on the host)
    t = torch.tensor([[0.01, 0.15, 0.35, 0.95]] * 2)
    n = t.shape[1]
    inp = WindowInput(x=x, t=t, caption=caption[:, None].expand(-1, n, -1, -1), caption_mask=mask[:, None].expand(-1, n, -1),
                      first_chunk=0, num_clean=0, lookback=None)
    ref = infer_guided_velocity(teacher, inp, None, SamplerConfig(cfg_number=cfg_number, **RELEASE))
    got = _ours(teacher, x, t, caption, mask, torch.zeros(2, n, dtype=torch.bool), cfg_number)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


@torch.no_grad()
def test_teacher_guided_velocity_equals_magi_infer_after_a_clean_prefix():
    """V2V: magi_infer prefills the clean prefix chunk into its KV cache (null caption, dropped flag) and guides the
    window behind it; the teacher sees the same chunk clean in front (null_caption_on_clean)."""
    teacher = _model(False, seed=3)
    x, caption, mask = _inputs(n=3)
    clean_t = 0.9999
    t = torch.tensor([[clean_t, 0.4, 0.08]] * 2)   # one schedule for the batch, as inference runs it
    B = 2
    cache = InferenceKVCache()
    null, null_mask = teacher.null_caption(B, 1, L)
    with cache.writing(range(1)):
        teacher(x[:, :, :CW], t[:, :1], null, null_mask, torch.ones(B, dtype=torch.bool), chunk_offset=0,
                kv_cache=cache, cache_write=True)
    inp = WindowInput(x=x[:, :, CW:], t=t[:, 1:], caption=caption[:, None].expand(-1, 2, -1, -1),
                      caption_mask=mask[:, None].expand(-1, 2, -1), first_chunk=1, num_clean=0, lookback=None)
    ref = infer_guided_velocity(teacher, inp, cache, SamplerConfig(cfg_number=3, **RELEASE))
    dropped = torch.tensor([[True, False, False]] * B)
    got = _ours(teacher, x, t, caption, mask, dropped)[:, :, CW:]
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()


# ----------------------------------------------------------------------------- the objective's targets
@torch.no_grad()
def test_objective_targets_are_teacher_at_the_finest_budget_and_student_half_steps_below():
    teacher, student = _model(False, seed=4), _model(True, seed=5)
    dcfg = DistillConfig(teacher="unused", budgets=[16, 8], budget_probs=[0.5, 0.5], **RELEASE)
    flow = FlowMatchingConfig(clean_prefix_prob=0.5, max_clean_prefix_chunks=1)
    obj = ShortcutDistillObjective(dcfg, flow, CW, torch.device("cpu"), teacher, student)
    x1, caption, mask = _inputs(B=8, n=3, seed=7)
    batch = {"latent": x1, "text_emb": caption, "text_mask": mask}
    kwargs, target, weight = obj.prepare(batch, torch.Generator().manual_seed(0), step=0)
    budget = 2 * kwargs["dt"][:, 0]
    assert set(budget.tolist()) == {16.0, 8.0}
    x, t, dropped, null = kwargs["x"], kwargs["t"], kwargs["caption_dropped"], kwargs["caption_null"]
    clean = weight == 0
    # the student sees clean context as cfg-1 serving gives it (null caption, 'kept' flag), the teacher as cfg 3
    assert bool(clean.any()) and not dropped.any() and torch.equal(null, clean)
    assert (t[:, 1:] <= t[:, :-1]).all()                       # per-chunk monotone, clean prefix first
    noisy = t[~clean]                                           # on the grid of each sample's budget
    assert torch.allclose(snap_to_grid(noisy, budget[:, None].expand_as(t)[~clean]), noisy, atol=1e-6)
    teacher_v = _ours(teacher, x, t, caption, mask, clean)
    fine = budget == 16
    assert torch.allclose(target[fine], teacher_v[fine], atol=1e-6)
    N = budget[:, None].expand_as(t)
    t_mid, t_next = step_times(t, N)
    t_mid, t_next = torch.where(clean, t, t_mid), torch.where(clean, t, t_next)
    code = budget_dt_code(2 * N)
    coarse = two_half_step_target(lambda xi, ti: student(xi, ti, caption, mask, dropped, code, caption_null=null),
                                  x, t, t_mid, t_next, CW)
    assert torch.allclose(target[~fine], coarse[~fine], atol=1e-6)


@pytest.mark.parametrize("num_clean", [0, 1])
@torch.no_grad()
def test_student_training_input_is_what_cfg1_serving_feeds(num_clean):
    """The student's input for a clean context chunk (prepare_inputs at served_cfg_number=1) gives the velocity
    magi_infer's cfg-1 path gives: behind a prefilled V2V prefix (num_clean 0) and with the finished chunk re-run at
    clean_t in front of the window (num_clean 1)."""
    student = _model(True, seed=6)
    x1, caption, mask = _inputs(n=3, seed=9)
    B, clean_t = 2, 0.9999
    flow = FlowMatchingConfig(clean_t=clean_t)
    levels = ChunkNoise(t=torch.tensor([[clean_t, 0.4, 0.1]] * B), clean=torch.tensor([[True, False, False]] * B))
    kwargs, _, _ = prepare_inputs({"latent": x1, "text_emb": caption, "text_mask": mask}, torch.Generator().manual_seed(0),
                                  flow, CW, noise_levels=levels, caption_dropout=0.0, served_cfg_number=1)
    dt = torch.full((B, 3), 4.0)
    got = student(**kwargs, dt=dt)[:, :, CW:]
    sampler = SamplerConfig(cfg_number=1, distill_nearly_clean_chunk_threshold=1.0)
    null, null_mask = student.null_caption(B, 1, L)
    cap, cmask = caption[:, None].expand(-1, 3, -1, -1).clone(), mask[:, None].expand(-1, 3, -1).clone()
    cap[:, :1], cmask[:, :1] = null, null_mask
    cache = InferenceKVCache()
    if num_clean == 0:   # ChunkGenerator.prefill's flag for cfg 1
        with cache.writing(range(1)):
            student(kwargs["x"][:, :, :CW], kwargs["t"][:, :1], cap[:, :1], cmask[:, :1],
                    torch.full((B,), context_dropped(1)), dt[:, :1], chunk_offset=0, kv_cache=cache, cache_write=True)
        inp = WindowInput(x=kwargs["x"][:, :, CW:], t=kwargs["t"][:, 1:], caption=cap[:, 1:], caption_mask=cmask[:, 1:],
                          first_chunk=1, num_clean=0, lookback=None, dt=dt[:, 1:])
    else:
        inp = WindowInput(x=kwargs["x"], t=kwargs["t"], caption=cap, caption_mask=cmask, first_chunk=0, num_clean=1,
                          lookback=None, dt=dt)
    ref = infer_guided_velocity(student, inp, cache, sampler)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
    # and it is not the 'dropped' encoding pre-training gives clean chunks
    other = student(kwargs["x"], kwargs["t"], caption, mask, levels.clean, dt)[:, :, CW:]
    assert not torch.allclose(other, ref, atol=1e-3)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("values, key", [
    (dict(budgets=[64, 16]), "distill.budgets"),
    (dict(budget_probs=[0.5, 0.5]), "distill.budget_probs"),
    (dict(budget_probs=[0.5, 0.5, 0.5, -0.5]), "distill.budget_probs"),
    (dict(target_model="teacher"), "distill.target_model"),
    (dict(loss="l1"), "distill.loss"),
    (dict(cfg_number=4), "distill.cfg_number"),
    (dict(text_scales=[1.0]), "distill.text_scales"),
    (dict(time_schedule="cosine"), "distill.time_schedule"),
])
def test_distill_config_errors_name_the_field(values, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        DistillConfig(**values)


def test_shortcut_distill_needs_teacher_student_and_init(tmp_path):
    from magi_train.config import validate_config
    from magi_train.training.config_loading import load_config

    base = ["experiment=smoke", "train.objective=shortcut_distill"]
    with pytest.raises(ConfigError, match="^distill.teacher: "):
        validate_config(load_config(base))
    with pytest.raises(ConfigError, match="^model.distill: "):
        validate_config(load_config([*base, f"distill.teacher={tmp_path}"]))
    with pytest.raises(ConfigError, match="^train.init_from: "):
        validate_config(load_config([*base, f"distill.teacher={tmp_path}", "model.distill=true"]))
    ready = [*base, f"distill.teacher={tmp_path}", "model.distill=true", f"train.init_from={tmp_path}"]
    with pytest.raises(ConfigError, match="^train.validation.every_steps: "):
        validate_config(load_config(ready))
    cfg = load_config([*ready, "train.validation.every_steps=0"])
    validate_config(cfg)
    assert dataclasses.asdict(cfg.distill)["budgets"] == [64, 32, 16, 8]


def test_plan_counts_the_teacher_and_its_forwards(capsys):
    from magi_train.objectives.distill_cost import teacher_forward_flops
    from magi_train.plan import build_plan_inputs, main
    from magi_train.parallel.memory_estimate import estimate
    from magi_train.training.flops import forward_flops

    keys = ["model=4.5B", "parallel.dp=8", "parallel.dp_mode=fsdp", "data.resolution=[480,832]", "data.num_frames=96"]
    cfg, pcfg, world, shape, precision, _, _, cost = build_plan_inputs([*keys, "train.objective=shortcut_distill",
                                                                        "distill.target_model=ema"])
    base = estimate(cfg, pcfg, world, shape, precision=precision)
    dist = estimate(cfg, pcfg, world, shape, precision=precision, **cost)
    assert cost["frozen_copies"] == 2
    assert dist.weights == pytest.approx(3 * base.weights)           # student + teacher + EMA target, same shards
    whole = forward_flops(cfg, 24, 60, 104, shape.caption_len)
    teacher = teacher_forward_flops(cfg, 24, 60, 104, shape.caption_len, 3)
    assert 2 * whole < teacher < 3 * whole                            # text + context + four one-chunk passes
    assert dist.flops_per_step == pytest.approx(base.flops_per_step / (3 * whole) * (teacher + 5 * whole))
    assert main([*keys, "train.objective=shortcut_distill", "distill.budgetz=[8]"]) == 2
    assert "distill.budgetz: unknown key" in capsys.readouterr().err


def test_distill_entry_point_is_training_with_the_distill_objective(tmp_path, capsys):
    """slurm/distill.sbatch runs magi_train.distill: the training entry point with the objective set first, so a
    missing teacher is the one-line config error of training (exit code 2)."""
    from magi_train.distill import main

    assert main(["--help"]) == 0 and "distill.*" in capsys.readouterr().out
    assert main(["experiment=smoke", f"output_dir={tmp_path}"]) == 2
    assert "distill.teacher: " in capsys.readouterr().err
