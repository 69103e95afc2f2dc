"""train.profile_steps: chosen training steps run under torch.profiler, to see where a step's time goes.

Each profiled step N writes, in the run directory (rank r of a parallel run adds _rank<r>):

  profile/step_<N>.summary.txt   the step's GPU time by phase (CUDA events at the loop's phase boundaries, so
                                 idle time between kernels counts where it happens), kernel time by kind
                                 (GEMM, attention, fused elementwise, optimizer, ...) and the top kernels
  profile/step_<N>.trace.json.gz the Chrome trace (chrome://tracing, Perfetto)

The phases: batch (next batch and the objective's inputs), forward_backward, grad_norm (the global norm and
clipping), optimizer (the update), after (scheduler, EMA, per-t-bin losses; ends at the step's last host sync).
A step that is not profiled records nothing."""
from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
from pathlib import Path

import torch

PHASES = ("batch", "forward_backward", "grad_norm", "optimizer", "after")
# kernel name -> kind, first match wins
# (inductor's kernels are named after the ops they fuse, an attention op's neighbours too: matched first)
KINDS = (("fused elementwise (inductor)", re.compile(r"^triton_(poi|pointwise)", re.I)),
         ("fused reduction (inductor)", re.compile(r"^triton_(red|per|reduction|persistent)", re.I)),
         ("other triton", re.compile(r"^triton", re.I)),
         ("optimizer", re.compile(r"adam|multi_tensor_apply", re.I)),
         ("attention", re.compile(r"attention|fmha|flash|sdpa|cudnn::fusion", re.I)),
         ("gemm", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|sm90_|matmul", re.I)),
         ("copy / fill", re.compile(r"memcpy|memset|copy|fill|cat|index", re.I)),
         ("reduction (aten)", re.compile(r"reduce|norm|sum", re.I)),
         ("elementwise (aten)", re.compile(r"elementwise", re.I)))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


class StepTimeline:
    """GPU timestamps at a step's phase boundaries; mark(name) closes phase `name`. Inactive: marks nothing."""

    def __init__(self, active: bool):
        self.active = active
        self.marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, name: str) -> None:
        if self.active:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))

    def phases_ms(self) -> dict[str, float]:
        """Phase -> GPU milliseconds (call after the step's events completed)."""
        return {name: start.elapsed_time(end) for (_, start), (name, end) in zip(self.marks, self.marks[1:])}


class StepProfiler:
    """profile(step) -> (context manager, timeline) for the step about to run as step number `step`."""

    def __init__(self, steps, run_dir: Path, device: torch.device, rank: int = 0, world_size: int = 1):
        self.steps = set(steps)
        self.dir = Path(run_dir) / "profile"
        self.cuda = device.type == "cuda"
        self.suffix = f"_rank{rank}" if world_size > 1 else ""

    def wants(self, step: int) -> bool:
        return step in self.steps

    def timeline(self, step: int) -> StepTimeline:
        return StepTimeline(self.cuda and self.wants(step))

    @contextlib.contextmanager
    def profile(self, step: int, timeline: StepTimeline):
        if not self.wants(step):
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            timeline.mark("start")   # once the profiler runs: its start-up is no phase of the step
            yield
        if self.cuda:
            torch.cuda.synchronize()
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"step_{step:08d}{self.suffix}"
        (stem.parent / (stem.name + ".summary.txt")).write_text(
            summary(prof, timeline.phases_ms() if timeline.active else {}, step))
        raw = stem.parent / (stem.name + ".trace.json")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)


def kernel_times(prof) -> list[tuple[str, int, float]]:
    """(kernel name, launches, total microseconds) of the profiled device work, longest first."""
    from torch.autograd import DeviceType

    rows = [(e.key, e.count, e.self_device_time_total) for e in prof.key_averages()
            if getattr(e, "device_type", None) == DeviceType.CUDA and e.self_device_time_total > 0
            and not getattr(e, "is_user_annotation", False)]   # a range's span on the GPU, not a kernel
    return sorted(rows, key=lambda r: -r[2])


def summary(prof, phases_ms: dict[str, float], step: int, top: int = 40) -> str:
    kernels = kernel_times(prof)
    busy_ms = sum(t for _, _, t in kernels) / 1e3
    out = [f"step {step}"]
    if phases_ms:
        total = sum(phases_ms.values())
        out.append(f"GPU time by phase (CUDA events; idle gaps included): {total:.1f} ms")
        out += [f"  {name:18s} {ms:10.1f} ms {100 * ms / total:6.1f} %" for name, ms in phases_ms.items()]
        out.append(f"  kernels busy {busy_ms:.1f} ms, idle {total - busy_ms:.1f} ms (one stream assumed)")
    kinds: dict[str, list[float]] = {}
    for name, n, t in kernels:
        k = kinds.setdefault(kernel_kind(name), [0, 0.0])
        k[0] += n
        k[1] += t
    out.append(f"kernel time by kind: {busy_ms:.1f} ms")
    out += [f"  {kind:30s} {t / 1e3:10.1f} ms {n:8d} launches" for kind, (n, t) in
            sorted(kinds.items(), key=lambda kv: -kv[1][1])]
    out.append(f"top {top} kernels (ms, launches, kind):")
    out += [f"  {t / 1e3:9.2f} {n:7d}  {kernel_kind(name):28s} {name[:160]}" for name, n, t in kernels[:top]]
    ops = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    out.append("top 15 operators by host time (ms self, launches):")
    out += [f"  {e.self_cpu_time_total / 1e3:9.2f} {e.count:7d}  {e.key[:120]}" for e in ops[:15]]
    return "\n".join(out) + "\n"


__all__ = ["StepProfiler", "StepTimeline", "PHASES", "kernel_kind", "summary", "kernel_times"]
