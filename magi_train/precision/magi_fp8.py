"""MAGI-1's fp8 checkpoint format: e4m3 weights [1, out, in] with per-tensor or SmoothQuant per-channel scales.

Layers (all blocks but the first and the last):
  per-tensor  (q, qx, k, v, fc1):  weight e4m3, weight_scale [1], input_scale [in]
  per-channel (linear_proj, fc2):  weight e4m3, weight_scale [1], input_scale [1], smooth_scale [1, in]
Compute: the input is divided by input_scale (per-tensor) or smooth_scale (per-channel), clamped to the e4m3 range
and rounded to e4m3; the product is rescaled by input_scale (its first element) and weight_scale. On CPU we
dequantise; on CUDA torch._scaled_mm runs the e4m3 GEMM.

Speed: written as separate tensor ops, the input's quantisation (cast to fp32, divide, clamp, cast to e4m3) makes
four passes over an fp32 copy of the activation, about 21 bytes an element, which for fc2's input costs more than
the fp8 GEMM saves (0.94x of bf16 measured). On CUDA the quantisation runs as one compiled kernel (bf16 in, e4m3
out: 3 bytes an element) with the same arithmetic when the compiled islands are on (model/fused_ops.use_compiled,
magi_infer's `compile` option, on by default for CUDA); see quantize_input."""
from __future__ import annotations

import functools

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max

PER_TENSOR_ROLES = ("q", "qx", "k", "v", "linear_fc1")
PER_CHANNEL_ROLES = ("linear_proj", "linear_fc2")


def _to_e4m3(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.float() / divisor.float(), -E4M3_MAX, E4M3_MAX).to(E4M3)


@functools.lru_cache(maxsize=1)
def _fused_to_e4m3():
    # the rows are marked dynamic (quantize_input): one kernel for every number of tokens, the input width fixed
    # (with every dim dynamic, fc2's input quantisation ran at about 1.2 TB/s on an H200; the fixed-width kernel
    # was timed only end to end, docs/benchmarks.md issue 19)
    return torch.compile(_to_e4m3, dynamic=False)


def quantize_input(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """[M, in] activation -> e4m3 with MAGI-1's rule: one fused kernel on CUDA with compiled islands on, else
    plain ops (the CPU path dequantises anyway)."""
    from magi_train.model.fused_ops import compiled_enabled

    if x.is_cuda and compiled_enabled():
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return _fused_to_e4m3()(x, divisor)
    return _to_e4m3(x, divisor)


class Fp8Linear(nn.Module):
    """A bias-free linear holding MAGI-1 fp8 tensors; kind is 'per_tensor' or 'per_channel'."""

    def __init__(self, in_features: int, out_features: int, kind: str, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        if kind not in ("per_tensor", "per_channel"):
            raise ValueError(f"fp8 kind: got {kind!r}, accepted values are 'per_tensor', 'per_channel'")
        self.in_features, self.out_features, self.kind, self.out_dtype = in_features, out_features, kind, out_dtype
        self.weight = nn.Parameter(torch.zeros(1, out_features, in_features, dtype=E4M3), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(1), requires_grad=False)
        if kind == "per_tensor":
            self.input_scale = nn.Parameter(torch.ones(in_features), requires_grad=False)
        else:
            self.input_scale = nn.Parameter(torch.ones(1), requires_grad=False)
            self.smooth_scale = nn.Parameter(torch.ones(1, in_features), requires_grad=False)

    def _divisor(self) -> torch.Tensor:
        return self.input_scale if self.kind == "per_tensor" else self.smooth_scale[0]

    @classmethod
    def fused_forward(cls, x: torch.Tensor, linears) -> list[torch.Tensor]:
        """[m(x) for m in linears] (block.fused_column_projection's hook: q, qx, k, v of one input). On CUDA, when
        they quantise the input alike (same kind and divisor: always so with weights-only scales), the input is
        quantised once and one e4m3 GEMM runs over the stacked weights, each keeping its own weight scale as
        per-output-column scales (torch._scaled_mm's rowwise mode). The split outputs equal the separate calls up
        to the GEMM's accumulation order."""
        if not (x.is_cuda and hasattr(torch, "_scaled_mm") and cls._share_input_rule(linears)):
            return [m(x) for m in linears]
        first = linears[0]
        shape = x.shape[:-1]
        xq = quantize_input(x.reshape(-1, first.in_features), first._divisor())
        w = torch.cat([m.weight[0] for m in linears])  # [sum out, in] e4m3, a copy of a few MB per call
        scale_b = torch.cat([m.weight_scale.float().expand(m.out_features) for m in linears])[None]
        scale_a = first.input_scale.flatten()[:1].float().expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        y = y.to(x.dtype if x.dtype != torch.float8_e4m3fn else first.out_dtype)
        return [o.reshape(*shape, m.out_features) for o, m in zip(y.split([m.out_features for m in linears], -1), linears)]

    @staticmethod
    def _share_input_rule(linears) -> bool:
        """True when every linear divides the input by the same scales (checked on the device once per set of
        scale tensors and their versions, so a reload re-checks; the check waits for the GPU that one time)."""
        first = linears[0]
        scales = [(m.input_scale, getattr(m, "smooth_scale", m.input_scale)) for m in linears]  # parameters, not views
        key = tuple((id(a), a._version, id(b), b._version) for a, b in scales)
        cached = getattr(first, "_shared_rule", None)
        if cached is None or cached[0] != key:
            same = all(m.kind == first.kind and m.in_features == first.in_features
                       and torch.equal(m._divisor(), first._divisor())
                       and torch.equal(m.input_scale.flatten()[:1], first.input_scale.flatten()[:1]) for m in linears)
            first._shared_rule = cached = (key, same)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        xq = quantize_input(x.reshape(-1, self.in_features), self._divisor())
        a_scale = self.input_scale.flatten()[:1].float()
        w = self.weight[0]
        if x.is_cuda and hasattr(torch, "_scaled_mm"):
            # w.t() is the column-major [in, out] view _scaled_mm wants: no copy of the weight per call
            y = torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=self.weight_scale.float(),
                                 out_dtype=torch.bfloat16)
        else:  # CPU: dequantise, same arithmetic in fp32
            y = (xq.float() * a_scale) @ (w.float() * self.weight_scale.float()).t()
        return y.reshape(*shape, self.out_features).to(x.dtype if x.dtype != torch.float8_e4m3fn else self.out_dtype)


def quantize_weight(weight: torch.Tensor, kind: str, act_amax: torch.Tensor | None = None, alpha: float = 0.5):
    """Float weight [out, in] -> MAGI-1 fp8 tensors (dict). act_amax: per-input-channel activation max for
    per_channel smoothing (SmoothQuant, alpha 0.5); without it, smoothing is 1 (plain per-tensor scaling)."""
    w = weight.float()
    if kind == "per_tensor":
        ws = (w.abs().max() / E4M3_MAX).clamp(min=1e-12).reshape(1)
        return {"weight": (w / ws).to(E4M3)[None], "weight_scale": ws,
                "input_scale": torch.ones(w.shape[1], device=w.device)}
    smooth = torch.ones(1, w.shape[1], device=w.device)
    if act_amax is not None:
        w_amax = w.abs().amax(dim=0).clamp(min=1e-5)
        smooth = (act_amax.to(w.device).float().clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).reshape(1, -1)
    ws_w = w * smooth
    ws = (ws_w.abs().max() / E4M3_MAX).clamp(min=1e-12).reshape(1)
    return {"weight": (ws_w / ws).to(E4M3)[None], "weight_scale": ws, "input_scale": torch.ones(1, device=w.device),
            "smooth_scale": smooth}


def fp8_layer_kind(name: str) -> str | None:
    """'per_tensor' / 'per_channel' / None for a block linear's module path (e.g. '...linear_qkv.q')."""
    leaf = name.split(".")[-1]
    if leaf in PER_TENSOR_ROLES:
        return "per_tensor"
    if leaf in PER_CHANNEL_ROLES:
        return "per_channel"
    return None


def fp8_layers(num_layers: int) -> range:
    """MAGI-1 keeps the first and the last block in high precision."""
    return range(1, num_layers - 1)


def swap_in_fp8_linears(model: nn.Module, out_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace the quantisable linears of the middle blocks by Fp8Linear (applied from outside the model)."""
    swapped = []
    layers = model.videodit_blocks.layers
    for i in fp8_layers(len(layers)):
        for name, module in list(layers[i].named_modules()):
            kind = fp8_layer_kind(name)
            if kind is None or not isinstance(module, nn.Linear):
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = layers[i].get_submodule(parent_name) if parent_name else layers[i]
            setattr(parent, leaf, Fp8Linear(module.in_features, module.out_features, kind, out_dtype).to(
                module.weight.device if not module.weight.is_meta else "cpu"))
            swapped.append(f"videodit_blocks.layers.{i}.{name}")
    return swapped
