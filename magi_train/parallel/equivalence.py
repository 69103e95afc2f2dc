"""Equivalence harness: each parallel layout against one process on the same weights, data and seed.

Run under torchrun (gloo on CPU, NCCL on GPU); every rank also computes the single-process reference itself.
    torchrun --nproc-per-node 2 -m magi_train.parallel.equivalence --layouts tp2,cp2,pp2,dp2
Prints one JSON line per layout (rank 0): relative errors of the loss, every gradient (max over tensors,
||g - g_ref|| / ||g_ref||), and of inference forwards (plain and KV-cached windows)."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from magi_train.config import ModelConfig, model_preset
from magi_train.config.parallel_config import ParallelConfig
from magi_train.model import KVCache, build_dit

LAYOUTS: dict[str, dict] = {
    # 2 processes
    "tp2": dict(tp=2, dp=1),
    "cp2": dict(cp=2, dp=1),
    "pp2": dict(pp=2, dp=1, pp_schedule="1f1b", pp_microbatches=4),
    "pp2_gpipe": dict(pp=2, dp=1, pp_schedule="gpipe", pp_microbatches=4),
    "pp2_interleaved": dict(pp=2, dp=1, pp_schedule="interleaved_1f1b", pp_virtual_stages=2, pp_microbatches=4),
    "dp2": dict(dp=2, dp_mode="fsdp"),
    "dp2_ddp": dict(dp=2, dp_mode="ddp"),
    "cp2_none": dict(cp=2, dp=1, dp_mode="none"),     # gradients reduced by finalize_grads alone
    # 4 processes
    "tp2cp2": dict(tp=2, cp=2, dp=1),
    "pp2dp2": dict(pp=2, dp=2, pp_microbatches=4),
    "tp2pp2": dict(tp=2, pp=2, dp=1, pp_microbatches=4),
    "cp2dp2": dict(cp=2, dp=2, dp_mode="fsdp"),
    "cp2dp2_ddp": dict(cp=2, dp=2, dp_mode="ddp"),
    "tp4": dict(tp=4, dp=1),            # tp > KV heads (2): replicated KV heads
    "tp2dp2": dict(tp=2, dp=2, dp_mode="fsdp"),
    "cp4_pad": dict(cp=4, dp=1),        # 54 tokens over 4 ranks: padded shards, one head per rank, K/V gathered
    # GPU only (megatron-core sequence parallelism allocates on CUDA)
    "tp2sp": dict(tp=2, dp=-1, sequence_parallel=True),
    "tp2cp2sp": dict(tp=2, cp=2, dp=-1, sequence_parallel=True),
    "dp2_offload": dict(dp=2, dp_mode="fsdp", fsdp_cpu_offload=True),
}


# latent (T, H, W) per layout; default (4, 4, 4): 2 chunks of 2 frames, 16 tokens
LATENTS = {"cp4_pad": (6, 6, 6)}


def equivalence_model_config(**overrides) -> ModelConfig:
    """Tiny shape with everything the layouts must get right: GQA, SwiGLU, 4 layers, 2-frame chunks."""
    kw = dict(chunk_width=2, num_layers=4, gated_linear_unit=True)
    kw.update(overrides)
    return model_preset("tiny", **kw)


def reference_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with every tensor perturbed (the zero-initialised final layer and norms would hide errors)."""
    torch.manual_seed(seed)
    model = build_dit(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_microbatches(cfg: ModelConfig, n: int, batch: int, seed: int = 0, latent=(4, 4, 4), caption_len: int = 8,
                      device="cpu"):
    """n microbatches of (model_kwargs, target, loss_weight) with per-chunk t, masks and one dropped caption."""
    g = torch.Generator().manual_seed(seed + 7)
    T, H, W = latent
    n_chunks = T // cfg.chunk_width
    out = []
    for _ in range(n):
        x = torch.randn(batch, cfg.latent_channels, T, H, W, generator=g)
        t = torch.rand(batch, n_chunks, generator=g).sort(dim=1, descending=True).values
        caption = torch.randn(batch, caption_len, cfg.caption_channels, generator=g)
        mask = torch.ones(batch, caption_len, dtype=torch.bool)
        mask[:, caption_len // 2 + 1:] = torch.rand(batch, caption_len - caption_len // 2 - 1, generator=g) > 0.5
        dropped = torch.zeros(batch, dtype=torch.bool)
        dropped[0] = True
        kwargs = dict(x=x, t=t, caption=caption, caption_mask=mask, caption_dropped=dropped)
        target = torch.randn(x.shape, generator=g)
        weight = torch.rand(batch, generator=g) + 0.5
        mb = ({k: v.to(device) for k, v in kwargs.items()}, target.to(device), weight.to(device))
        out.append(mb)
    return out


def loss_fn(v, target, weight):
    per_sample = ((v - target) ** 2).mean(dim=tuple(range(1, v.dim())))
    return (per_sample * weight).mean()


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(floor))


def grad_floor(grads: dict[str, torch.Tensor]) -> float:
    """Denominator floor for relative gradient errors: 1e-2 x the median gradient norm. Some gradients are
    analytically zero and numerically ~1e-10 (the cross-attention key bias: softmax ignores a shift shared
    by all keys); their relative error would measure round-off, not the layout."""
    norms = sorted(float(g.double().norm()) for g in grads.values())
    return 1e-2 * norms[len(norms) // 2]


def _dp_slice(mbs, dp: int, dp_rank: int):
    out = []
    for kwargs, target, weight in mbs:
        B = target.shape[0] // dp
        sl = slice(dp_rank * B, (dp_rank + 1) * B)
        out.append(({k: v[sl] for k, v in kwargs.items()}, target[sl], weight[sl]))
    return out


def _reference(cfg, state, mbs):
    from magi_train.parallel.step import forward_backward

    model = build_dit(cfg, device=mbs[0][1].device)
    model.load_state_dict(state)
    loss = forward_backward(model, mbs, loss_fn)
    return model, float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _kv_windows(model, kwargs_list):
    """Chunk 0 written to a KV cache (clean pass), then chunk 1 attending to it: MAGI-1's inference pattern."""
    cache = KVCache()
    outs = []
    for i, kw in enumerate(kwargs_list):
        outs.append(model(**kw, chunk_offset=i, kv_cache=cache, cache_write=True))
    return outs


def run_layout(name: str, cfg: ModelConfig, state, device, *, batch: int = 2, infer: bool = True,
               seed: int = 0, env=None) -> dict:
    from magi_train.parallel import forward_backward, init_parallel, parallelize
    from magi_train.parallel.gather import full_state

    pcfg = ParallelConfig(**LAYOUTS[name])
    t0 = time.perf_counter()
    env = init_parallel(pcfg)
    n_mb = pcfg.pp_microbatches if pcfg.pp > 1 else 2
    global_mbs = make_microbatches(cfg, n_mb, batch * env.dp, seed=seed, device=device,
                                   latent=LATENTS.get(name, (4, 4, 4)))
    ref_model, ref_loss, ref_grads = _reference(cfg, {k: v.to(device) for k, v in state.items()}, global_mbs)

    model = parallelize(cfg, env=env, full_state={k: v.to(device) for k, v in state.items()})
    local = _dp_slice(global_mbs, env.dp, env.dp_rank)
    loss = forward_backward(model, local, loss_fn)
    loss = loss.detach().clone().to(device)
    if env.dp > 1:
        dist.all_reduce(loss, group=env.dp_group)
        loss /= env.dp
    grads = full_state(model, grads=True)
    worst, worst_name, worst_plain = 0.0, "", 0.0
    floor = grad_floor(ref_grads)
    for n, g_ref in ref_grads.items():
        r = _rel(grads[n], g_ref, floor)
        if float(g_ref.double().norm()) >= floor:
            worst_plain = max(worst_plain, _rel(grads[n], g_ref))
        if os.environ.get("MAGI_EQUIV_DEBUG") and r > 1e-5 and env.rank == 0:
            print(f"  {name}: {n} rel {r:.3g}", flush=True)
        if r > worst:
            worst, worst_name = r, n
    missing = sorted(set(ref_grads) - set(grads))
    result = dict(layout=name, world=env.world_size, loss=float(loss), loss_ref=ref_loss,
                  loss_rel=abs(float(loss) - ref_loss) / abs(ref_loss), grad_rel_max=worst, grad_worst=worst_name,
                  grad_rel_max_above_floor=worst_plain,
                  grads_compared=len(ref_grads), missing=missing)
    if infer:
        with torch.no_grad():
            kw = _dp_slice(global_mbs[:1], env.dp, env.dp_rank)[0][0]     # this rank's samples
            ref_kw = _dp_slice(global_mbs[:1], 1, 0)[0][0]
            B = kw["x"].shape[0]
            mine = slice(env.dp_rank * B, (env.dp_rank + 1) * B)
            result["forward_rel"] = _rel(model(**kw), ref_model(**ref_kw)[mine])
            # KV-cached windows, one chunk each, as inference runs them
            w = cfg.chunk_width
            windows = [{**kw, "x": kw["x"][:, :, i * w:(i + 1) * w], "t": kw["t"][:, i:i + 1]} for i in range(2)]
            ref_mine = {k: v[mine] for k, v in ref_kw.items()}    # the same samples, from the global batch
            ref_windows = [{**ref_mine, "x": ref_mine["x"][:, :, i * w:(i + 1) * w], "t": ref_mine["t"][:, i:i + 1]}
                           for i in range(2)]
            result["kv_forward_rel"] = max(_rel(a, b) for a, b in zip(_kv_windows(model, windows),
                                                                      _kv_windows(ref_model, ref_windows)))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layouts", default="tp2,cp2,pp2,dp2")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file (rank 0)")
    ap.add_argument("--reshard", default=None,
                    help="SAVE:LOAD1+LOAD2 (e.g. tp2:cp2+dp2+pp2) checks DCP resharding and MAGI-1 export")
    ap.add_argument("--dir", default="/tmp/magi_equivalence", help="scratch directory for --reshard (shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = equivalence_model_config()
    state = reference_state(cfg)
    results = []
    for name in [n for n in args.layouts.split(",") if n]:
        res = run_layout(name, cfg, state, device, infer=not args.no_infer)
        results.append(res)
        if int(os.environ.get("RANK", 0)) == 0:
            line = json.dumps(res)
            print("EQUIV " + line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    if args.reshard:
        save, loads = args.reshard.split(":")
        for res in run_resharding(save, loads.split("+"), cfg, state, device, args.dir):
            if int(os.environ.get("RANK", 0)) == 0:
                print("EQUIV " + json.dumps(res), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(res) + "\n")
    from magi_train.parallel import destroy_parallel

    destroy_parallel()



# ----------------------------------------------------------------------------- resharding
def _gathered_optimizer(model, optimizer, key: str = "exp_avg") -> dict[str, torch.Tensor]:
    from magi_train.parallel.parallelize import plan_of
    from magi_train.parallel.state_dict_adapter import gather_tp_tensor

    plan = plan_of(model)
    out = {}
    for n, p in plan.named_parameters():
        out[n] = gather_tp_tensor(n, optimizer.state[p][key], plan.model_cfg, plan.env.tp_group).cpu()
    if plan.env.pp > 1:
        parts = [None] * plan.env.pp
        dist.all_gather_object(parts, out, group=plan.env.pp_group)
        out = {k: v for part in parts for k, v in part.items()}
    return out


def run_resharding(save_layout: str, load_layouts: list[str], cfg: ModelConfig, state, device, directory: str,
                   single_process_check: bool = True) -> list[dict]:
    """Train one step under save_layout, save model+optimizer (DCP) and a MAGI-1 export; load both under every
    layout of load_layouts (and, on rank 0, into one plain process); forwards and optimizer moments must agree."""
    from magi_train.checkpoint.magi_format import load_magi_checkpoint
    from magi_train.checkpoint import sharded as ckpt
    from magi_train.parallel import forward_backward, init_parallel, parallelize
    from magi_train.parallel.env import ParallelEnv

    ckpt_dir, export_dir = os.path.join(directory, "dcp"), os.path.join(directory, "magi_export")
    pcfg = ParallelConfig(**LAYOUTS[save_layout])
    env = init_parallel(pcfg)
    n_mb = pcfg.pp_microbatches if pcfg.pp > 1 else 2
    mbs = make_microbatches(cfg, n_mb, 2 * env.dp, seed=3, device=device)
    probe = make_microbatches(cfg, 1, 2, seed=5, device=device)[0][0]   # the forward every layout must agree on
    model = parallelize(cfg, env=env, full_state={k: v.to(device) for k, v in state.items()})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    forward_backward(model, _dp_slice(mbs, env.dp, env.dp_rank), loss_fn)
    opt.step()
    opt.zero_grad()
    ref_moments = _gathered_optimizer(model, opt)
    with torch.no_grad():
        v_ref = model(**probe).cpu()
    if env.rank == 0:
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    dist.barrier()
    ckpt.save(model, ckpt_dir, opt)
    ckpt.export_magi(model, export_dir)
    dist.barrier()
    results = []
    for name in load_layouts:
        pcfg = ParallelConfig(**LAYOUTS[name])
        env = init_parallel(pcfg)
        model = parallelize(cfg, env=env, seed=123)          # different weights until the load
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ckpt.load(model, ckpt_dir, opt)
        moments = _gathered_optimizer(model, opt)
        with torch.no_grad():
            v = model(**probe).cpu()
        results.append(dict(check="reshard", saved=save_layout, loaded=name, forward_rel=_rel(v, v_ref),
                            exp_avg_rel=max(_rel(moments[k], ref_moments[k], 1e-12) for k in ref_moments)))
    if single_process_check and dist.get_rank() == 0:
        env1 = ParallelEnv(pcfg=ParallelConfig(dp=1), device=device)      # one process, no groups
        model = parallelize(cfg, env=env1, seed=321)
        ckpt.load(model, ckpt_dir)
        with torch.no_grad():
            v = model(**probe).cpu()
        results.append(dict(check="reshard", saved=save_layout, loaded="single_process", forward_rel=_rel(v, v_ref)))
        plain = build_dit(cfg)
        load_magi_checkpoint(plain, export_dir)
        with torch.no_grad():
            v = plain.to(device)(**probe).cpu()
        results.append(dict(check="magi_export", saved=save_layout, loaded="build_dit", forward_rel=_rel(v, v_ref)))
    dist.barrier()
    return results


if __name__ == "__main__":
    main()
