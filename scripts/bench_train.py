"""Training speed through the real entry point (python -m magi_train.train on synthetic latents): one table row a
run, read from the run's metrics.jsonl after warm-up.

  python scripts/bench_train.py                                        # 4.5B, 37,440 tokens a sample, one GPU:
                                                                       # bf16 / torchao fp8, recompute, compile
  python scripts/bench_train.py --run recompute=selective,compile=true --run fp8=torchao,recompute=selective,compile=true
  python scripts/bench_train.py --set model.num_layers=12 --steps 8 --warmup 3
  python scripts/bench_train.py --nproc 4 --set parallel.dp=4 parallel.dp_mode=fsdp     # under torchrun
  python scripts/bench_train.py --run recompute=selective,compile=true --profile prof/   # + one profiled step

A run is a comma list of short keys (fp8, fp8_recipe, recompute, recompute_every, recompute_keep,
recompute_keep_extra, recompute_extra_blocks, compile, precision: the train.* keys of the same name; the keep lists'
names joined by '+', e.g. recompute_keep=proj+fc2, or 'none') or full overrides (key.sub=value; e.g.
model.attention_backend=cudnn_fp8 for fp8 attention, whose runs the precision column names). --profile DIR runs
one more step after the measured ones under torch.profiler (train.profile_steps; not in the table's numbers) and
copies its summary (GPU time by phase, kernel time by kind, top kernels) and Chrome trace to DIR. Columns: model TFLOP/s counts 3 x forward FLOPs
(magi_train.training.flops; recompute excluded, as MFU usually is); 'with recompute' adds the FLOPs the recompute
policy runs again (full: the blocks' forward; selective: their linear layers), i.e. what the GPU executed. MFU is
against the bf16 dense peak of the device (989 TFLOP/s on H100/H200) also for fp8 runs. Peak memory is
torch.cuda.max_memory_allocated of rank 0 (the process's peak resident memory on CPU). Mean loss: over the steps
after warm-up; runs of one --set draw the same data and noise, so precisions compare on it."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# 4.5B at 4 chunks of 480p (24 x 60 x 104 latent: 37,440 tokens a sample), as issue 20 measures it
BASE = ["experiment=smoke", "model=4.5B", "model.attention_backend=sdpa_chunked", "data.latent_frames=24",
        "data.latent_height=60", "data.latent_width=104", "data.batch_size=1", "data.text_length=64",
        "train.ema.enabled=false", "train.precision=bf16", "train.checkpoint.every_steps=0",
        "train.checkpoint.save_at_end=false", "train.checkpoint.export_at_end=false", "train.validation.every_steps=0",
        "train.progress_bar=false", "train.log_every=1", "train.wandb.mode=disabled"]
SHORT = ("fp8", "fp8_recipe", "fp8_all_gather", "recompute", "recompute_every", "recompute_keep",
         "recompute_keep_extra", "recompute_extra_blocks", "compile", "precision")
DEFAULT_RUNS = ["recompute=full", "recompute=selective,compile=true",
                "fp8=torchao,recompute=selective,compile=true"]


def overrides_of(run: str) -> list[str]:
    out = []
    for item in filter(None, run.split(",")):
        key, _, value = item.partition("=")
        if key in ("recompute_keep", "recompute_keep_extra"):
            value = "[" + ",".join(v for v in value.split("+") if v != "none") + "]"
        out.append(f"train.{key}={value}" if key in SHORT else item)
    return out


def merged(*lists: list[str]) -> list[str]:
    """Overrides with one value a key, the last one winning (hydra refuses a key given twice)."""
    out: dict[str, str] = {}
    for item in (x for lst in lists for x in lst):
        out[item.partition("=")[0]] = item
    return list(out.values())


def launch(overrides: list[str], nproc: int, out_dir: Path, log) -> int:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "magi_train.train"]
    else:
        cmd = [sys.executable, "-m", "magi_train.train"]
    cmd += overrides + [f"output_dir={out_dir}", "name=bench"]
    print("+", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def summarise(run_dir: Path, warmup: int, nproc: int = 1) -> dict:
    """Steady-state numbers of one run from its metrics.jsonl and config.yaml."""
    from omegaconf import OmegaConf

    from magi_train.config import build_config
    from magi_train.parallel.memory_estimate import recompute_flops
    from magi_train.parallel.recompute import RecomputePolicy
    from magi_train.training.flops import train_flops
    from magi_train.training.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    measured = cfg_steps(run_dir)
    steady = [records[s] for s in sorted(records) if warmup < s <= measured]
    if not steady:
        raise RuntimeError(f"{run_dir}: no step after the {warmup} warm-up steps")
    cfg = build_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True))
    d, m, t = cfg.data, cfg.model, cfg.train
    step_s = statistics.median(r["step_time_s"] for r in steady)
    model_tflops = statistics.median(r["tflops_per_device"] for r in steady)
    sample = train_flops(m, d.latent_frames, d.latent_height, d.latent_width, d.text_length)
    extra = recompute_flops(m, d.latent_frames, d.latent_height, d.latent_width, d.text_length,
                            RecomputePolicy(t.recompute, t.recompute_every, tuple(t.recompute_keep),
                                            tuple(t.recompute_keep_extra), t.recompute_extra_blocks), cfg.parallel.pp)
    hw_tflops = model_tflops * (sample + extra) / sample
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    peak = statistics.median(mfu) / model_tflops if mfu else None   # 1 / peak TFLOP/s
    from magi_train.precision.fp8_training import Fp8Settings

    p = cfg.parallel
    dp = p.resolved_dp(nproc)
    layout = "1 process" if nproc == 1 else f"tp{p.tp} cp{p.cp} pp{p.pp} dp{dp}" + (f" {p.dp_mode}" if dp > 1 else "")
    fp8 = Fp8Settings(t.fp8, t.fp8_recipe, t.fp8_all_gather)
    return {"layout": layout, "layers": m.num_layers, "precision": t.precision + ("" if t.fp8 == "none" else
            f"+{t.fp8} {fp8.resolved_recipe}") + (" + fp8 attention (cudnn_fp8)" if m.attention_backend ==
            "cudnn_fp8" else ""), "recompute": t.recompute + (f"/{t.recompute_every}" if
            t.recompute_every > 1 else "") + (f" keep {'+'.join(t.recompute_keep) or 'none'}" if
            t.recompute == "selective" else "") + (f", last {t.recompute_extra_blocks} also "
            f"{'+'.join(t.recompute_keep_extra)}" if t.recompute_extra_blocks else ""), "compile": t.compile, "steps": len(steady), "step_s": step_s,
            "tokens_s": statistics.median(r["tokens_per_s"] for r in steady), "tflops": model_tflops,
            "tflops_hw": hw_tflops, "mfu": model_tflops * peak if peak else None,
            "mfu_hw": hw_tflops * peak if peak else None,
            "peak_gib": max(r["peak_mem_gib"] for r in steady),
            "loss": statistics.fmean(r["loss"] for r in steady)}


def cfg_steps(run_dir: Path) -> int:
    """The steps a run measured: all but a profiled last one (train.profile_steps)."""
    from omegaconf import OmegaConf

    t = OmegaConf.load(run_dir / "config.yaml").train
    return t.max_steps - (1 if t.max_steps in t.profile_steps else 0)


def table(rows: list[dict]) -> str:
    head = ("| layout | layers | precision | recompute | compile | s/step | tokens/s | model TFLOP/s | MFU | "
            "TFLOP/s with recompute | MFU with recompute | peak GiB | mean loss |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['run']} | failed: {r['error']} |")
            continue
        pct = (lambda x: f"{100 * x:.1f} %" if x is not None else "n/a")
        out.append(f"| {r['layout']} | {r['layers']} | {r['precision']} | {r['recompute']} | {r['compile']} | "
                   f"{r['step_s']:.3f} | {r['tokens_s']:,.0f} | {r['tflops']:.3g} | {pct(r['mfu'])} | "
                   f"{r['tflops_hw']:.3g} | {pct(r['mfu_hw'])} | {r['peak_gib']:.1f} | {r['loss']:.4f} |")
    return "\n".join(out)


def copy_profile(src: Path, dest: Path, prefix: str) -> None:
    """The profiled step's files, named by run, into dest; the summary also to stderr."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("step_*")):
        shutil.copy(f, dest / f"{prefix}_{f.name}")
        if f.name.endswith(".summary.txt"):
            print(f"{prefix}: {f.read_text()}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", help=f"one run (repeatable); default: {' | '.join(DEFAULT_RUNS)}")
    p.add_argument("--set", nargs="*", default=[], help="overrides for every run (after the 4.5B defaults)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps a run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out (compile, allocator, cuDNN plans)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) a run")
    p.add_argument("--keep", default=None, help="keep the run directories (and logs) under this folder")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile one step after the measured ones; its summary and trace go to DIR")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_train_"))
    rows = []
    for i, run in enumerate(args.run or DEFAULT_RUNS):
        out_dir = root / f"run{i}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        steps = args.steps + (1 if args.profile else 0)
        extra = [f"train.profile_steps=[{steps}]"] if args.profile else []
        overrides = merged(BASE, args.set, overrides_of(run), [f"train.max_steps={steps}"], extra)
        with open(out_dir / "log.txt", "w") as log:
            rc = launch(overrides, args.nproc, out_dir, log)
        if rc != 0:
            tail = (out_dir / "log.txt").read_text().strip().splitlines()[-1:] or ["?"]
            rows.append({"run": run, "error": f"exit {rc}: {tail[0][:160]}"})
        else:
            rows.append({"run": run, **summarise(out_dir / "bench", args.warmup, args.nproc)})
            if args.profile:
                copy_profile(out_dir / "bench" / "profile", Path(args.profile), f"run{i}")
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
