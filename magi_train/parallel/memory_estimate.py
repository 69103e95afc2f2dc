"""Per-GPU memory and FLOPs of a training step under a parallel layout, without running it.

Weights, gradients and optimizer states are counted exactly from the shapes each rank holds (TP shards,
this rank's pipeline stage, FSDP shards over dp x cp). Activations use per-token byte counts of one
transformer layer: what autograd keeps for backward in magi_train/model/block.py with a flash-style
attention (sdpa_chunked / flex / flash_attn: no S x S matrix), measured with memory_tracker.LiveBytes and
fitted over layer shapes (max error 0.4 %); tests/test_plan.py re-measures them, so a change of the block
that moves them fails there. `measure_peak` runs a real step for comparison."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from magi_train.config import ModelConfig
from magi_train.config.parallel_config import ParallelConfig
from magi_train.config.train_config import DEFAULT_RECOMPUTE_KEEP

# Bytes kept per token by one layer, by local width (per element of D, Q, ... ) for fp32 runs and for bf16
# weights under bf16 autocast. Q/K: local query / KV width (heads x head_dim); kv_expanded: 2K (the attention's
# own K/V); q_folded: Q, replacing it under GQA, where sdpa_chunked folds the query heads of a KV group into its
# sequence (a copy of q; refitted on CPU after the fold, bf16's scaled by the fp32 : bf16 ratio of kv_expanded);
# F: local ffn width; H: local heads.
STORED = {
    # fp32 refitted (4 CPU layers, LiveBytes) after the fused q/qx/k/v GEMM met the fused fp32 islands in block.py;
    # Q then lowered by one saved Q-wide tensor (4 bytes fp32, measured on CPU; 2 bytes bf16, inferred, not
    # re-measured on a GPU) when the attentions began writing into linear_proj's buffer and qx's norm stopped
    # copying it. On CUDA the GQA fold (q_folded) no longer copies q (enable_gqa): bf16 estimates with grouped
    # heads stay about 2 bytes per Q element high there (conservative).
    "fp32": dict(D=49.71, Q=10.99, kv_expanded=18.44, q_folded=33.0, K=9.40, F_gated=18.25, F_gelu=8.79, H=0.29,
                 const=-1265.5),
    "bf16": dict(D=30.67, Q=3.88, kv_expanded=11.76, q_folded=21.0, K=8.92, F_gated=8.42, F_gelu=4.39, H=0.18,
                 const=-265.6),
}
# extra bytes per token while one layer runs its backward: the larger of a residual-width and an ffn-width term
BACKWARD = {"fp32": dict(D=8.0, F_gated=7.25, F_gelu=4.3), "bf16": dict(D=14.0, F_gated=3.6, F_gelu=3.5)}
# per token outside the layers (embedding, RoPE tables, final layer, loss), per element of D and of the output
OUTSIDE = {"fp32": dict(D=9.0, P=13.25, R=8.0), "bf16": dict(D=9.0, P=13.25, R=8.0)}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}
GiB = 2**30


@dataclass
class StepShape:
    """One optimizer step: latent size of a sample, samples per microbatch (per rank) and microbatches."""

    latent_frames: int
    latent_height: int
    latent_width: int
    batch_size: int = 1
    microbatches: int = 1
    caption_len: int = 800

    def tokens(self, cfg: ModelConfig) -> int:
        return (self.latent_frames // cfg.t_patch_size) * (self.latent_height // cfg.patch_size) * \
            (self.latent_width // cfg.patch_size)


@dataclass
class MemoryEstimate:
    world_size: int
    dp: int
    params_per_gpu: int                 # parameters this GPU holds (after TP/PP cut and FSDP sharding)
    weights: float                      # bytes
    grads: float
    optimizer: float
    activations: float                  # train.recompute=none (largest stage, microbatches in flight)
    activations_ckpt: float             # train.recompute=full (the blocks of recompute_every)
    activations_selective: float        # train.recompute=selective: block inputs, attention and kept GEMM outputs
    fsdp_buffers: float                 # unsharded layer(s) FSDP gathers around the running one
    peak: float
    peak_ckpt: float
    peak_selective: float
    flops_per_step: float               # whole step, all GPUs (3 x forward, no recompute)
    flops_per_gpu: float
    tokens_per_sample: int
    layers_per_stage: int
    inflight: int                       # microbatches whose activations one stage holds at once
    recompute_every: int = 1
    notes: list[str] = field(default_factory=list)

    def peak_for(self, recompute: str) -> float:
        """Peak bytes under train.recompute = none | full | selective."""
        return {"none": self.peak, "full": self.peak_ckpt, "selective": self.peak_selective}[recompute]

    def table(self) -> str:
        every = f", every {self.recompute_every}" if self.recompute_every > 1 else ""
        rows = [("weights", self.weights), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("FSDP gathered layers", self.fsdp_buffers), ("activations (recompute none)", self.activations),
                (f"activations (recompute full{every})", self.activations_ckpt),
                (f"activations (recompute selective{every})", self.activations_selective),
                ("peak, recompute none", self.peak), (f"peak, recompute full{every}", self.peak_ckpt),
                (f"peak, recompute selective{every}", self.peak_selective)]
        out = [f"{name:40s} {b / GiB:10.2f} GiB" for name, b in rows]
        out.append(f"{'parameters per GPU':40s} {self.params_per_gpu / 1e9:10.3f} B")
        out.append(f"{'tokens per sample':40s} {self.tokens_per_sample:10d}")
        out.append(f"{'layers per pipeline stage':40s} {self.layers_per_stage:10d}   "
                   f"({self.inflight} microbatch(es) in flight)")
        out.append(f"{'FLOPs per step (all GPUs)':40s} {self.flops_per_step:10.3e}")
        out.append(f"{'FLOPs per step per GPU':40s} {self.flops_per_gpu:10.3e}")
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def _layer_params(cfg: ModelConfig, tp: int) -> tuple[int, int]:
    """(TP-sharded, replicated) parameter counts of one layer on one TP rank."""
    D, hd = cfg.hidden_size, cfg.kv_channels
    Q = cfg.q_dim // tp
    K = cfg.kv_dim // tp if tp <= cfg.num_query_groups else hd
    F = cfg.ffn_hidden_size // tp
    gated = 2 if cfg.gated_linear_unit else 1
    sharded = 2 * D * Q + 2 * D * K + cfg.xattn_dim * 2 * K + 2 * Q * D + D * F * gated + F * D
    gate_out = int(D * cfg.cond_gating_ratio) * 2
    replicated = cfg.cond_dim * gate_out + gate_out + 2 * D + 4 * 2 * hd + 2 * 2 * D + 2 * D
    return sharded, replicated


def _outside_params(cfg: ModelConfig) -> dict[str, int]:
    D, cd = cfg.hidden_size, cfg.cond_dim
    patch = cfg.patch_size * cfg.patch_size * cfg.t_patch_size
    t_embedder = 256 * cd + cd + cd * cd + cd
    y_embedder = (cfg.caption_channels * cfg.xattn_dim + cfg.xattn_dim + cfg.caption_channels * cd + cd
                  + cfg.caption_max_length * cfg.caption_channels)
    rope = cfg.kv_channels // 8
    return dict(x_embedder=cfg.in_channels * D * patch, shared=t_embedder + y_embedder + rope,
                final=2 * D + D * patch * cfg.out_channels)


def count_params(cfg: ModelConfig) -> int:
    sharded, replicated = _layer_params(cfg, 1)
    return cfg.num_layers * (sharded + replicated) + sum(_outside_params(cfg).values())


def _stage_layers(num_layers: int, stages: int) -> list[int]:
    from .pipeline import split_layers

    return [len(r) for r in split_layers(num_layers, stages)]


def _inflight(pcfg: ParallelConfig, microbatches: int) -> tuple[int, int]:
    """(chunks of activations the busiest rank holds, virtual stages per rank)."""
    if pcfg.pp == 1:
        return 1, 1
    if pcfg.pp_schedule == "gpipe":
        return microbatches, 1
    if pcfg.pp_schedule == "interleaved_1f1b":
        v = pcfg.pp_virtual_stages
        return min(microbatches * v, (v - 1) * pcfg.pp + 2 * (pcfg.pp - 1) + 1), v
    return min(microbatches, pcfg.pp), 1


def _per_token_layer(cfg: ModelConfig, tp: int, precision: str) -> tuple[float, float, float]:
    """(stored bytes per residual-stream token split as (D part, rest), backward extra) of one layer."""
    c = STORED[precision]
    hd = cfg.kv_channels
    hq = cfg.num_attention_heads // tp
    hkv = max(1, cfg.num_query_groups // tp)
    Q, K, F, D = hq * hd, hkv * hd, cfg.ffn_hidden_size // tp, cfg.hidden_size
    attn_copy = c["q_folded"] * Q if hq // hkv > 1 else c["kv_expanded"] * 2 * K
    f_term = c["F_gated"] * F if cfg.gated_linear_unit else c["F_gelu"] * F
    rest = c["Q"] * Q + attn_copy + c["K"] * K + f_term + c["H"] * hq + c["const"]
    b = BACKWARD[precision]
    bwd = max(b["D"] * D, (b["F_gated"] if cfg.gated_linear_unit else b["F_gelu"]) * F)
    return c["D"] * D, rest, bwd


def estimate(cfg: ModelConfig, pcfg: ParallelConfig, world_size: int, shape: StepShape, *,
             precision: str = "bf16", optimizer: str = "adamw", optimizer_foreach: bool | None = None,
             frozen_copies: int = 0, sample_flops: float | None = None, recompute_every: int = 1,
             recompute_keep: tuple = DEFAULT_RECOMPUTE_KEEP, recompute_extra: tuple = (),
             recompute_extra_blocks: int = 0) -> MemoryEstimate:
    """precision: 'bf16' (bf16 autocast; weights in model.params_dtype) or 'fp32'. frozen_copies: frozen models
    placed like the trained one (a distillation teacher, an EMA target), counted as weights; sample_flops: FLOPs
    of one sample's step when the objective runs more than one forward and backward (distillation).
    recompute_every: every k-th block of a stage is recomputed (train.recompute_every), the others keep all their
    activations; recompute_keep: the linears whose GEMM output selective keeps (train.recompute_keep);
    recompute_extra / recompute_extra_blocks: more linears kept in the last blocks of each stage."""
    dp = pcfg.validate_world(world_size)
    pcfg.validate_model(cfg)
    tp, cp, pp = pcfg.tp, pcfg.cp, pcfg.pp
    notes = []
    pbytes = 4 if cfg.params_dtype == "float32" else 2
    abytes = 4 if precision == "fp32" else 2
    inflight, virtual = _inflight(pcfg, shape.microbatches)
    stages = pp * virtual
    layers = _stage_layers(cfg.num_layers, stages)
    sharded, replicated = _layer_params(cfg, tp)
    outside = _outside_params(cfg)
    # worst rank: the first pipeline rank (embedding + most in-flight microbatches) or the largest stage
    rank_layers = [sum(layers[r + k * pp] for k in range(virtual)) for r in range(pp)]
    params_by_rank = []
    for r in range(pp):
        n = rank_layers[r] * (sharded + replicated) + outside["shared"] * virtual
        n += outside["x_embedder"] if r == 0 else 0
        n += outside["final"] if r == (stages - 1) % pp else 0
        params_by_rank.append(n)
    rank = max(range(pp), key=lambda r: (params_by_rank[r], -r))
    n_params = params_by_rank[rank]
    shard = dp * cp if pcfg.dp_mode == "fsdp" else 1
    local_params = math.ceil(n_params / shard)
    on_gpu = 0.0 if pcfg.fsdp_cpu_offload else 1.0
    weights = local_params * pbytes * on_gpu
    grads = local_params * pbytes * on_gpu
    states = OPTIMIZER_STATES.get(optimizer, 2)
    opt_bytes = local_params * pbytes * states * on_gpu
    frozen = frozen_copies * local_params * pbytes * on_gpu
    if frozen_copies:   # sharded like the trained weights; their no-grad forwards run before the step's own
        notes.append(f"weights include {frozen_copies} frozen cop{'y' if frozen_copies == 1 else 'ies'} "
                     f"(teacher, EMA target): {frozen / GiB:.2f} GiB")
    fsdp_buffers = 0.0
    if pcfg.dp_mode == "fsdp" and shard > 1:
        fsdp_buffers = 2 * (sharded + replicated) * pbytes   # the running layer and the prefetched one
    if pcfg.fsdp_cpu_offload:
        notes.append(f"weights, gradients and optimizer states ({(2 + states) * local_params * pbytes / GiB:.1f} GiB) "
                     f"live in CPU memory (fsdp_cpu_offload)")

    # activations, one microbatch
    S = shape.tokens(cfg)
    B = shape.batch_size
    s_att = math.ceil(S / cp)
    s_res = math.ceil(s_att / tp) if pcfg.sequence_parallel else s_att
    d_part, rest, bwd = _per_token_layer(cfg, tp, precision)
    ulysses = (cfg.q_dim // tp) * abytes if cp > 1 else 0.0     # the all-to-all output holding q and qx
    per_layer = B * (s_res * d_part + s_att * (rest + ulysses))
    per_layer_bwd = B * s_att * bwd
    layer_input = B * s_res * cfg.hidden_size * pbytes
    o = OUTSIDE[precision]
    patch_out = cfg.patch_size * cfg.patch_size * cfg.t_patch_size * cfg.out_channels
    outside_act = B * S * (o["D"] * cfg.hidden_size + o["P"] * patch_out + o["R"] * 3 * cfg.kv_channels // 8)
    caption = B * (shape.latent_frames // cfg.chunk_width) * shape.caption_len * cfg.xattn_dim * 4 * 2
    n_layers = rank_layers[rank]
    per_chunk_layers = max(layers)
    chunks = inflight
    held = per_chunk_layers if virtual > 1 else n_layers
    recomputed = -(-held // recompute_every)            # blocks 0, k, 2k, ... of the stage
    # selective keeps each recomputed block's input and its attention kernels' outputs (self and cross: the
    # output and the fp32 logsumexp per query head)
    hq = cfg.num_attention_heads // tp
    attn_kept = B * s_att * 2 * (hq * cfg.kv_channels * abytes + hq * 4)
    # and the outputs of the kept linears' GEMMs (autocast dtype): column-parallel ones over the attention's
    # tokens, the row-parallel proj and fc2 over the residual stream's
    ffn_out = cfg.ffn_hidden_size * (2 if cfg.gated_linear_unit else 1)
    widths = {"qkv": (s_att, (2 * cfg.q_dim + 2 * cfg.kv_dim) // tp), "fc1": (s_att, ffn_out // tp),
              "proj": (s_res, cfg.hidden_size), "fc2": (s_res, cfg.hidden_size)}
    attn_kept += sum(B * widths[k][0] * widths[k][1] * abytes for k in recompute_keep)
    # the last recompute_extra_blocks blocks of the stage keep recompute_extra too
    extra_kept = sum(B * widths[k][0] * widths[k][1] * abytes for k in recompute_extra if k not in recompute_keep)
    extra_blocks = sum(1 for i in range(held) if i % recompute_every == 0 and i >= held - recompute_extra_blocks)
    last_recomputed = (held - 1) // recompute_every * recompute_every

    def activations_with(stored_recomputed: float, extra: float = 0.0) -> float:
        a = chunks * ((held - recomputed) * per_layer + recomputed * stored_recomputed + extra_blocks * extra)
        # the block running its recompute holds its whole forward again, its stored tensors included (reused):
        # at the peak that is the last recomputed block, whose backward runs first
        stored_last = stored_recomputed + (extra if last_recomputed >= held - recompute_extra_blocks else 0.0)
        again = per_layer - stored_last if stored_last < per_layer else 0
        return a + per_layer_bwd + again + chunks * (outside_act + caption)

    act = activations_with(per_layer)
    act_ckpt = activations_with(layer_input)
    act_sel = activations_with(layer_input + attn_kept, extra_kept)

    # peak: backward starts with every activation and few gradients, ends with every gradient; the optimizer
    # step then adds its temporaries (foreach AdamW: one parameter-sized list, measured; fused: none)
    foreach = optimizer_foreach if optimizer_foreach is not None else (precision == "fp32")
    opt_tmp = weights if (foreach and optimizer == "adamw") else 0.0
    weights += frozen
    base = weights + opt_bytes + fsdp_buffers

    def peak_with(a):
        return max(base + a, base + grads + per_layer_bwd, weights + opt_bytes + grads + opt_tmp)

    from magi_train.training.flops import train_flops

    samples = B * shape.microbatches * dp
    if sample_flops is None:
        sample_flops = train_flops(cfg, shape.latent_frames, shape.latent_height, shape.latent_width, shape.caption_len)
    flops = sample_flops * samples
    if cp > 1:
        notes.append("context parallel: attention runs Ulysses-style, every rank the same share of the "
                     "chunk-causal work")
    return MemoryEstimate(world_size=world_size, dp=dp, params_per_gpu=local_params, weights=weights, grads=grads,
                          optimizer=opt_bytes, activations=act, activations_ckpt=act_ckpt,
                          activations_selective=act_sel, fsdp_buffers=fsdp_buffers, peak=peak_with(act),
                          peak_ckpt=peak_with(act_ckpt), peak_selective=peak_with(act_sel), flops_per_step=flops,
                          flops_per_gpu=flops / world_size, tokens_per_sample=S, layers_per_stage=n_layers,
                          inflight=inflight, recompute_every=recompute_every, notes=notes)


def recompute_flops(cfg: ModelConfig, latent_frames: int, latent_h: int, latent_w: int, caption_len: int,
                    policy, stages: int = 1) -> float:
    """FLOPs a recompute policy runs again in backward for one sample (not model FLOPs): full reruns the
    recomputed blocks' forward, selective their linear layers but the kept ones (the attention outputs are kept)."""
    from magi_train.training.flops import layer_forward_flops, layer_linear_flops

    if policy.mode == "none":
        return 0.0
    blocks = sum(policy.recomputed(i) for n in _stage_layers(cfg.num_layers, stages) for i in range(n))
    if policy.mode == "full":
        return float(blocks * layer_forward_flops(cfg, latent_frames, latent_h, latent_w, caption_len))
    linears = layer_linear_flops(cfg, latent_frames, latent_h, latent_w, caption_len)
    total = 0.0
    for n in _stage_layers(cfg.num_layers, stages):
        for i in range(n):
            if policy.recomputed(i):
                kept = policy.kept(i, n)
                total += sum(f for name, f in linears.items() if name not in kept)
    return total


def measure_peak(cfg: ModelConfig, shape: StepShape, *, precision: str = "fp32", steps: int = 2,
                 recompute: str = "none", recompute_keep: tuple = DEFAULT_RECOMPUTE_KEEP, recompute_extra: tuple = (),
                 recompute_extra_blocks: int = 0, device: str = "cpu", seed: int = 0) -> float:
    """Peak bytes of live tensors over the last of `steps` single-process training steps (AdamW, foreach on CPU,
    fused on GPU). CPU: counted at the dispatcher (LiveBytes); CUDA: torch.cuda.max_memory_allocated."""
    import contextlib

    import torch
    from magi_train.model import build_dit

    from .memory_tracker import LiveBytes
    from .recompute import RecomputePolicy, apply_recompute
    from .step import forward_backward

    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    n_chunks = shape.latent_frames // cfg.chunk_width
    mbs = []
    for _ in range(shape.microbatches):
        x = torch.randn(shape.batch_size, cfg.latent_channels, shape.latent_frames, shape.latent_height,
                        shape.latent_width, generator=g)
        kw = dict(x=x.to(dev), t=torch.rand(shape.batch_size, n_chunks, generator=g).to(dev),
                  caption=torch.randn(shape.batch_size, shape.caption_len, cfg.caption_channels, generator=g).to(dev))
        mbs.append((kw, torch.randn(x.shape, generator=g).to(dev), torch.ones(shape.batch_size, device=dev)))

    def loss_fn(v, target, w):
        return (((v - target) ** 2).mean(dim=tuple(range(1, v.dim()))) * w).mean()

    tracker = LiveBytes() if dev.type == "cpu" else None
    with tracker if tracker is not None else contextlib.nullcontext():
        model = build_dit(cfg, device=dev)
        apply_recompute(model, RecomputePolicy(recompute, keep=recompute_keep, extra=recompute_extra,
                                               extra_blocks=recompute_extra_blocks))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=dev.type == "cpu",
                                fused=dev.type == "cuda")
        autocast = torch.bfloat16 if precision == "bf16" else None
        for step in range(steps):
            if step == steps - 1:
                if tracker is not None:
                    tracker.reset_peak()
                else:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
            forward_backward(model, mbs, loss_fn, autocast_dtype=autocast)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if tracker is not None:
            return float(tracker.peak - sum(t.untyped_storage().nbytes() for mb in mbs for t in
                                            [*mb[0].values(), mb[1], mb[2]]))
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
