"""Will a layout fit? Per-GPU memory and FLOPs of one training step, from the same keys as training.

    python -m magi_train.plan model=24B parallel.tp=8 parallel.pp=2 parallel.cp=2 world_size=64 \\
        data.resolution=[720,1280] data.num_frames=96 data.batch_size=1 parallel.pp_microbatches=8

Keys: model=<preset> and model.<field>; parallel.<field>; data.resolution=[H,W] + data.num_frames (video
pixels and frames; the MAGI-1 VAE makes them 8x / 4x smaller) or data.latent_frames/latent_height/latent_width;
data.batch_size (per rank and microbatch); data.text_length (caption tokens, default model.caption_max_length);
train.grad_accum_steps (microbatches when pp=1); train.precision (bf16 | fp32); train.recompute (none | full |
selective), train.recompute_every, train.recompute_keep, train.recompute_keep_extra and train.recompute_extra_blocks
(with recompute_keep_extra given, the plan also prints the most blocks that can keep it and still fit); world_size (or nodes x gpus_per_node; default tp*cp*pp*dp); gpu_memory_gib (default 80).
Distillation: train.objective=shortcut_distill counts the frozen teacher (and distill.target_model=ema's copy)
beside the student and the teacher's guidance passes (distill.cfg_number) and the target's two half steps."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import fields

from omegaconf import OmegaConf

from magi_train.config import ConfigError, model_preset
from magi_train.config.parallel_config import ParallelConfig
from magi_train.config.train_config import DEFAULT_RECOMPUTE_KEEP, RECOMPUTE_KEEP, RECOMPUTE_MODES
from magi_train.parallel.memory_estimate import GiB, StepShape, estimate
from magi_train.parallel.recompute import RecomputePolicy

VAE_SPATIAL, VAE_TEMPORAL = 8, 4
PLAN_KEYS = ("world_size", "nodes", "gpus_per_node", "gpu_memory_gib")


def _parse(argv: list[str]) -> dict:
    for a in argv:
        if "=" not in a:
            raise ConfigError(f"{a}: expected key=value (e.g. model=24B parallel.tp=8)")
    return OmegaConf.to_container(OmegaConf.from_dotlist(argv), resolve=True)


def build_plan_inputs(argv: list[str]):
    tree = _parse(argv)
    unknown = set(tree) - {"model", "parallel", "data", "train", "distill", *PLAN_KEYS}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key; accepted: model, parallel.*, data.*, train.*, "
                          f"distill.*, {', '.join(PLAN_KEYS)}")
    model = tree.get("model", "tiny")
    if isinstance(model, dict):
        preset = model.pop("preset", "tiny")
        cfg = model_preset(str(preset), **model)
    else:
        cfg = model_preset(str(model))
    pkeys = {f.name for f in fields(ParallelConfig)}
    par = tree.get("parallel", {}) or {}
    for k in par:
        if k not in pkeys:
            raise ConfigError(f"parallel.{k}: unknown key; accepted keys are {', '.join(sorted(pkeys))}")
    pcfg = ParallelConfig(**par)
    data = tree.get("data", {}) or {}
    train = tree.get("train", {}) or {}
    if "resolution" in data:
        res = data["resolution"]
        if isinstance(res, str):
            res = [int(v) for v in res.lower().split("x")]
        h, w = (int(v) for v in res)
        if "num_frames" not in data:
            raise ConfigError("data.num_frames: needed with data.resolution (video frames per sample)")
        lf, lh, lw = int(data["num_frames"]) // VAE_TEMPORAL, h // VAE_SPATIAL, w // VAE_SPATIAL
    else:
        lf = int(data.get("latent_frames", cfg.chunk_width * 4))
        lh, lw = int(data.get("latent_height", 32)), int(data.get("latent_width", 32))
    # whole chunks and whole patches, as the data pipeline crops them
    lf = max(cfg.chunk_width, lf // cfg.chunk_width * cfg.chunk_width)
    lh, lw = lh // cfg.patch_size * cfg.patch_size, lw // cfg.patch_size * cfg.patch_size
    micro = pcfg.pp_microbatches if pcfg.pp > 1 else int(train.get("grad_accum_steps", 1))
    shape = StepShape(lf, lh, lw, batch_size=int(data.get("batch_size", 1)), microbatches=micro,
                      caption_len=int(data.get("text_length", cfg.caption_max_length)))
    if "world_size" in tree:
        world = int(tree["world_size"])
    elif "nodes" in tree or "gpus_per_node" in tree:
        world = int(tree.get("nodes", 1)) * int(tree.get("gpus_per_node", 8))
    else:
        world = pcfg.tp * pcfg.cp * pcfg.pp * max(pcfg.dp, 1)
    precision = str(train.get("precision", "bf16"))
    if precision == "auto":
        precision = "bf16"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"train.precision: got {precision!r}, accepted values are 'bf16', 'fp32', 'auto'")
    recompute = str(train.get("recompute", "none"))
    if recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"train.recompute: got {recompute!r}, accepted values are "
                          f"{', '.join(map(repr, RECOMPUTE_MODES))}")
    every = train.get("recompute_every", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"train.recompute_every: must be an integer >= 1, got {every!r}")
    keep = train.get("recompute_keep", list(DEFAULT_RECOMPUTE_KEEP))
    if not isinstance(keep, (list, tuple)) or any(k not in RECOMPUTE_KEEP for k in keep):
        raise ConfigError(f"train.recompute_keep: got {keep!r}, accepted: a list of {', '.join(RECOMPUTE_KEEP)}")
    extra = train.get("recompute_keep_extra", [])
    if not isinstance(extra, (list, tuple)) or any(k not in RECOMPUTE_KEEP for k in extra):
        raise ConfigError(f"train.recompute_keep_extra: got {extra!r}, accepted: a list of {', '.join(RECOMPUTE_KEEP)}")
    extra_blocks = train.get("recompute_extra_blocks", 0)
    if not isinstance(extra_blocks, int) or isinstance(extra_blocks, bool) or extra_blocks < 0:
        raise ConfigError(f"train.recompute_extra_blocks: must be an integer >= 0, got {extra_blocks!r}")
    policy = RecomputePolicy(recompute, every, tuple(keep), tuple(extra), extra_blocks)
    return cfg, pcfg, world, shape, precision, policy, float(tree.get("gpu_memory_gib", 80)), \
        _objective_cost(train, tree.get("distill", {}) or {}, cfg, shape)


def _estimate(cfg, pcfg, world, shape, precision, policy: RecomputePolicy, cost: dict, extra_blocks=None):
    return estimate(cfg, pcfg, world, shape, precision=precision, recompute_every=policy.every,
                    recompute_keep=policy.keep, recompute_extra=policy.extra,
                    recompute_extra_blocks=policy.extra_blocks if extra_blocks is None else extra_blocks, **cost)


def most_extra_blocks(cfg, pcfg, world, shape, precision, policy: RecomputePolicy, cost: dict, budget: float) -> int:
    """The largest train.recompute_extra_blocks whose selective peak fits in `budget` bytes (-1: not even 0)."""
    best = -1
    for k in range(cfg.num_layers + 1):   # the peak grows with k
        if _estimate(cfg, pcfg, world, shape, precision, policy, cost, k).peak_selective > budget:
            break
        best = k
    return best


def _objective_cost(train: dict, distill: dict, cfg, shape) -> dict:
    """estimate()'s extra keywords for the objective: frozen copies and FLOPs of a distillation step."""
    objective = str(train.get("objective", "flow_matching"))
    if objective == "flow_matching":
        return {}
    if objective != "shortcut_distill":
        raise ConfigError(f"train.objective: got {objective!r}, accepted values are 'flow_matching', 'shortcut_distill'")
    from magi_train.config.distill_config import DistillConfig
    from magi_train.objectives.distill_cost import distill_step_flops, frozen_copies

    known = {f.name for f in fields(DistillConfig)}
    for k in distill:
        if k not in known:
            raise ConfigError(f"distill.{k}: unknown key; accepted keys are {', '.join(sorted(known))}")
    d = DistillConfig(**distill)
    return dict(frozen_copies=frozen_copies(d.target_model),
                sample_flops=distill_step_flops(cfg, shape.latent_frames, shape.latent_height, shape.latent_width,
                                                shape.caption_len, d.cfg_number))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg, pcfg, world, shape, precision, policy, gpu_gib, cost = build_plan_inputs(argv)
        est = _estimate(cfg, pcfg, world, shape, precision, policy, cost)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {cfg.num_layers} layers x {cfg.hidden_size}, {est.params_per_gpu / 1e9:.3f}B parameters per GPU; "
          f"layout tp={pcfg.tp} cp={pcfg.cp} pp={pcfg.pp} dp={est.dp} ({pcfg.dp_mode}) on {world} GPUs; "
          f"sample {shape.latent_frames}x{shape.latent_height}x{shape.latent_width} latent "
          f"({est.tokens_per_sample} tokens), batch {shape.batch_size} x {shape.microbatches} microbatches, "
          f"{precision}")
    print(est.table())
    from magi_train.parallel.memory_estimate import recompute_flops

    recompute, every, keep = policy.mode, policy.every, policy.keep
    fits = {m: est.peak_for(m) <= gpu_gib * GiB for m in RECOMPUTE_MODES}
    sample = est.flops_per_step / (shape.batch_size * shape.microbatches * est.dp)
    for m in RECOMPUTE_MODES:
        extra = recompute_flops(cfg, shape.latent_frames, shape.latent_height, shape.latent_width, shape.caption_len,
                                dataclasses.replace(policy, mode=m), pcfg.pp)
        more = f", the last {policy.extra_blocks} also {'/'.join(policy.extra)}" if policy.extra_blocks else ""
        print(f"recompute {m:9s}: peak {est.peak_for(m) / GiB:8.1f} GiB per GPU "
              f"({'fits' if fits[m] else 'does NOT fit'} in {gpu_gib:.0f} GiB), "
              f"+{100 * extra / sample:.1f} % FLOPs run again" +
              (f", keeps the {'/'.join(keep)} GEMM outputs{more}" if m == "selective" and keep else ""))
    if policy.extra:
        k = most_extra_blocks(cfg, pcfg, world, shape, precision, policy, cost, gpu_gib * GiB)
        print(f"train.recompute_keep_extra={list(policy.extra)}: " +
              (f"at most train.recompute_extra_blocks={k} of {est.layers_per_stage} blocks a stage fit in "
               f"{gpu_gib:.0f} GiB (selective)" if k >= 0 else f"selective does not fit in {gpu_gib:.0f} GiB"))
    verdict = "fits" if fits[recompute] else "does NOT fit"
    print(f"train.recompute={recompute}" + (f" (every {every})" if every > 1 else "") +
          f": {est.peak_for(recompute) / GiB:.1f} GiB per GPU -> {verdict} in {gpu_gib:.0f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
