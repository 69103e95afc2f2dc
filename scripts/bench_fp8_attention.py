"""cuDNN fp8 attention (model.attention_backend=cudnn_fp8) at the 4.5B training shape, on a Hopper GPU with
nvidia-cudnn-frontend; the numbers of docs/benchmarks.md's "fp8 attention (issues 19, 20)":
  - relative error of the output and of dq/dk/dv against bf16 per-chunk SDPA (4 chunks of 9,360 tokens, 24/8 heads)
  - the kernels of one chunk's forward and backward (q 9,360 over 37,440 keys), from torch.profiler
  - cuDNN's sdpa_fp8_backward, which the backend does not use (on Hopper its dQ/dK/dV are fp8 and need their
    scales before the call), timed with its casts and compared for error under two scale rules: 'oracle' (each
    tensor's true amax, what delayed scaling converges to) and 'bound' (upper bounds from norms of dO, v, q, k
    taken before the call, e5m2 gradients for the range).

    python scripts/bench_fp8_attention.py
"""
import math

import torch
import torch.nn.functional as F

import cudnn
from magi_train.model import ChunkLayout, chunk_causal_attention
from magi_train.model import attention_fp8 as fp8

print("cudnn frontend", cudnn.__version__, "backend", cudnn.backend_version(), torch.cuda.get_device_name(), flush=True)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bshd(S, H, std=1.0):
    return (torch.randn(1, S, H, 128, device="cuda") * std).bfloat16().transpose(1, 2)


n, T = 4, 9360
q, k, v = bshd(n * T, 24), bshd(n * T, 8), bshd(n * T, 8)
lay = ChunkLayout.causal(n, T)
for t in (q, k, v):
    t.requires_grad_(True)
w = torch.randn(q.shape, device="cuda").bfloat16()
res = {}
for b in ("sdpa_chunked", "cudnn_fp8"):
    o = chunk_causal_attention(q, k, v, lay, b)
    res[b] = [o.detach(), *torch.autograd.grad(o, (q, k, v), w)]
print("4x9360 rel err vs bf16: " + " ".join(f"{nm} {rel(a, r):.4f}" for nm, a, r in
      zip(("out", "dq", "dk", "dv"), res["cudnn_fp8"], res["sdpa_chunked"])), flush=True)
del res

# one chunk of the training shape: q 9360 over kv 37440
Sq, Skv = 9360, 37440
q1, k1, v1 = q.detach()[:, :, -Sq:], k.detach(), v.detach()
do1 = w[:, :, -Sq:]
out, st = fp8.forward_impl(q1, k1, v1, Sq, [0, Skv], True)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for _ in range(2):
    fp8.forward_impl(q1, k1, v1, Sq, [0, Skv], True)
    fp8.backward_impl(do1, q1, k1, v1, out, st, Sq, [0, Skv])
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fp8.forward_impl(q1, k1, v1, Sq, [0, Skv], True)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70), flush=True)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        fp8.backward_impl(do1, q1, k1, v1, out, st, Sq, [0, Skv])
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70), flush=True)

# ---- sdpa_fp8_backward, per-tensor scales
f8, f5, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FP8_E5M2, cudnn.data_type.FLOAT
TD = {f8: torch.float8_e4m3fn, f5: torch.float8_e5m2}
MAXV = {f8: 448.0, f5: 57344.0}


def fp8_bwd_graph(Sq, Skv, g_dt):
    g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32)
    sd = lambda s, h: [s * h * 128, 128, h * 128, 1]  # noqa: E731
    mk = lambda d, s, t: g.tensor(dim=d, stride=s, data_type=t)  # noqa: E731
    tq, tk, tv = mk([1, 24, Sq, 128], sd(Sq, 24), f8), mk([1, 8, Skv, 128], sd(Skv, 8), f8), mk([1, 8, Skv, 128], sd(Skv, 8), f8)
    to, tdo = mk([1, 24, Sq, 128], sd(Sq, 24), f8), mk([1, 24, Sq, 128], sd(Sq, 24), g_dt)
    tst = mk([1, 24, Sq, 1], [24 * Sq, Sq, 1, 1], f32)
    sc = [mk([1, 1, 1, 1], [1, 1, 1, 1], f32) for _ in range(12)]
    outs = g.sdpa_fp8_backward(q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tst, descale_q=sc[0], descale_k=sc[1],
                               descale_v=sc[2], descale_o=sc[3], descale_dO=sc[4], descale_s=sc[5], descale_dP=sc[6],
                               scale_s=sc[7], scale_dQ=sc[8], scale_dK=sc[9], scale_dV=sc[10], scale_dP=sc[11],
                               attn_scale=1 / math.sqrt(128), use_causal_mask=False)
    for t, (s, h) in zip(outs[:3], ((Sq, 24), (Skv, 8), (Skv, 8))):
        t.set_output(True).set_dim([1, h, s, 128]).set_stride(sd(s, h)).set_data_type(g_dt)
    for t in outs[3:]:
        t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    gr, ws = fp8._build(g)
    return gr, ws, (tq, tk, tv, to, tdo, tst), sc, outs


def fp8_backward(qb, kb, vb, ob, dob, stb, g_dt, rule, graph=None):
    Sq, Skv = qb.shape[2], kb.shape[2]
    gr, ws, ins, sc, outs = graph or fp8_bwd_graph(Sq, Skv, g_dt)
    one = lambda x: x.reshape(1, 1, 1, 1).float()  # noqa: E731
    sq, dsq = fp8.current_scale(qb)
    sk, dsk = fp8.current_scale(kb)
    sv, dsv = fp8.current_scale(vb)
    so, dso = fp8.output_scale(sv)
    gmax = MAXV[g_dt]
    amax_do = torch.linalg.vector_norm(dob.float(), float("inf"))
    sdo = one(gmax / amax_do)
    bshd_ = lambda x, dt: (x.float() * 1).transpose(1, 2).contiguous()  # noqa: E731
    q8 = (bshd_(qb, 0) * sq.reshape(())).to(torch.float8_e4m3fn)
    k8 = (bshd_(kb, 0) * sk.reshape(())).to(torch.float8_e4m3fn)
    v8 = (bshd_(vb, 0) * sv.reshape(())).to(torch.float8_e4m3fn)
    o8 = (bshd_(ob, 0) * so.reshape(())).clamp(-448, 448).to(torch.float8_e4m3fn)
    do8 = (bshd_(dob, 0) * sdo.reshape(())).to(TD[g_dt])
    if rule == "bound":  # norms before the call
        don = torch.linalg.vector_norm(dob.float(), dim=-1).max()
        vn = torch.linalg.vector_norm(vb.float(), dim=-1).max()
        a = 1 / math.sqrt(128)
        amax_dp = 2 * don * vn
        amax_dq = a * amax_dp * kb.float().abs().max()
        amax_dk = a * amax_dp * qb.float().abs().max() * Sq
        amax_dv = amax_do * Sq
        amaxes = [amax_dq, amax_dk, amax_dv, amax_dp]
    else:
        amaxes = rule
    scales = [one(gmax / x) for x in amaxes]
    bufs = {ins[0]: q8, ins[1]: k8, ins[2]: v8, ins[3]: o8, ins[4]: do8, ins[5]: stb}
    vals = [dsq, dsk, dsv, dso, 1 / sdo, one(torch.tensor(1 / 448.0)), 1 / scales[3], one(torch.tensor(448.0)),
            scales[0], scales[1], scales[2], scales[3]]
    bufs.update({s: v.reshape(1, 1, 1, 1).float().cuda().contiguous() for s, v in zip(sc, vals)})
    res = [torch.empty(1, s, h, 128, device="cuda", dtype=TD[g_dt]) for s, h in ((Sq, 24), (Skv, 8), (Skv, 8))]
    am = [torch.empty(1, 1, 1, 1, device="cuda") for _ in range(4)]
    bufs.update(dict(zip(outs[:3], res)))
    bufs.update(dict(zip(outs[3:], am)))
    gr.execute(bufs, torch.empty(max(ws, 1), dtype=torch.uint8, device="cuda"), handle=fp8._on_stream(q.device))
    grads = [r.float().transpose(1, 2) / s.reshape(()) for r, s in zip(res, scales[:3])]
    return grads, am


def reference(qb, kb, vb, dob):
    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (qb, kb, vb))
    o = F.scaled_dot_product_attention(qr, kr, vr, enable_gqa=True)
    return torch.autograd.grad(o, (qr, kr, vr), dob)


for Sq_, Skv_ in ((9360, 37440),):
    qb, kb, vb = q1[:, :, -Sq_:], k1[:, :, :Skv_], v1[:, :, :Skv_]
    dob = do1[:, :, -Sq_:]
    ob, stb = fp8.forward_impl(qb, kb, vb, Sq_, [0, Skv_], True)
    stb = stb[0]
    ref = reference(qb, kb, vb, dob)
    for g_dt, rule in ((f8, "oracle"), (f5, "bound")):
        try:
            graph = fp8_bwd_graph(Sq_, Skv_, g_dt)
            grads, am = fp8_backward(qb, kb, vb, ob, dob, stb, g_dt, [torch.tensor(1.0, device="cuda")] * 4, graph)
            if rule == "oracle":
                grads, am2 = fp8_backward(qb, kb, vb, ob, dob, stb, g_dt, [a.reshape(()) for a in am], graph)
            else:
                grads, am2 = fp8_backward(qb, kb, vb, ob, dob, stb, g_dt, "bound", graph)
            errs = " ".join(f"{nm} {rel(a, r):.4f}" for nm, a, r in zip(("dq", "dk", "dv"), grads, ref))
            line = f"sdpa_fp8_backward {Sq_}x{Skv_} grads {'e4m3' if g_dt == f8 else 'e5m2'} {rule}: {errs}"
            if Sq_ == 9360:
                st_ = torch.cuda.Event(enable_timing=True)
                en = torch.cuda.Event(enable_timing=True)
                rule_ = "bound" if rule == "bound" else [a.reshape(()) for a in am]
                st_.record()
                for _ in range(5):
                    fp8_backward(qb, kb, vb, ob, dob, stb, g_dt, rule_, graph)
                en.record()
                torch.cuda.synchronize()
                line += f"; {st_.elapsed_time(en) / 5:.2f} ms with its casts"
            print(line, flush=True)
        except Exception as ex:
            print(f"sdpa_fp8_backward {Sq_}x{Skv_} {g_dt} {rule}: failed {type(ex).__name__}: {str(ex)[:200]}", flush=True)
