#!/usr/bin/env python3
"""Plain-PyTorch BlackMamba decode loop at batch 1: the baseline of `blackmamba bench`.

Our own straightforward PyTorch version of one BlackMamba decode step (SPEC §2-§5: RMSNorm,
Mamba step with the conv window and the selective-state update, top-1 sigmoid-routed MoE with the
GELU-gated expert, final LayerNorm and tied head), on random weights of the released shapes,
timed two ways:

  eager   one Python step per token; the MoE reads only the chosen expert (its index comes to the
          host with .item(), one sync per MoE layer, as the reference code's loop over experts does)
  graph   the whole step captured once as a CUDA graph (torch.cuda.graph) and replayed; the expert
          is picked on the device with index_select, which copies the chosen expert's weights
          (a graph cannot branch on a host value), then the token is fed back on the device

Both wait for each token (the host reads the sampled id), like `blackmamba bench`'s graph mode.

  python3 bench/torch_baseline.py --shape 2.8b --gen-len 256 [--modes eager,graph] [--json]
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"1.5b": (1152, 30, 3072), "2.8b": (1472, 36, 3872)}
N, K, E, V = 16, 4, 8, 50304


def build(shape, dtype, dev, seed):
    d, layers, f = SHAPES[shape]
    di, r = 2 * d, math.ceil(d / 16)
    g = torch.Generator(device=dev).manual_seed(seed)

    def uni(rows, cols, bound):
        return ((torch.rand(rows, cols, device=dev, generator=g) * 2 - 1) * bound).to(dtype)

    depth = 1 / math.sqrt(layers)
    model = {"emb": (torch.randn(V, d, device=dev, generator=g) * 0.02).to(dtype), "layers": []}
    for i in range(layers):
        if i % 2 == 0:
            dt = torch.exp(torch.rand(di, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            dt = dt.clamp(min=1e-4)
            model["layers"].append({
                "kind": "mamba",
                "norm": torch.ones(d, device=dev),
                "in_w": uni(2 * di, d, 1 / math.sqrt(d)),
                "conv_w": (torch.rand(di, K, device=dev, generator=g) - 0.5),
                "conv_b": torch.zeros(di, device=dev),
                "x_w": uni(r + 2 * N, di, 1 / math.sqrt(di)),
                "dt_w": uni(di, r, 1 / math.sqrt(r)),
                "dt_b": dt + torch.log(-torch.expm1(-dt)),
                "A": -torch.log(torch.arange(1, N + 1, device=dev, dtype=torch.float32)).exp().repeat(di, 1),
                "D": torch.ones(di, device=dev),
                "out_w": uni(d, di, depth / math.sqrt(di)),
            })
        else:
            model["layers"].append({
                "kind": "moe",
                "norm": torch.ones(d, device=dev),
                "router_w": ((torch.rand(E, d, device=dev, generator=g) * 2 - 1) / math.sqrt(d)),
                "router_b": torch.zeros(E, device=dev),
                "fc1": torch.stack([uni(2 * f, d, 1 / math.sqrt(d)) for _ in range(E)]),
                "fc2": torch.stack([uni(d, f, depth / math.sqrt(f)) for _ in range(E)]),
            })
    model["final_w"] = torch.ones(d, device=dev)
    model["final_b"] = torch.zeros(d, device=dev)
    model.update(d=d, di=di, r=r, f=f, dtype=dtype)
    return model


def new_state(m, dev):
    n_m = sum(1 for l in m["layers"] if l["kind"] == "mamba")
    return (torch.zeros(n_m, m["di"], K, device=dev), torch.zeros(n_m, m["di"], N, device=dev))


def rmsnorm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def step(m, tok, conv, ssm, route_on_host):
    """One token: tok (1,) long -> next token (1,) long; conv/ssm updated in place."""
    dt, di, r, f = m["dtype"], m["di"], m["r"], m["f"]
    res = m["emb"][tok].float()  # (1, d)
    j = 0
    for l in m["layers"]:
        x = rmsnorm(res, l["norm"]).to(dt)
        if l["kind"] == "mamba":
            xz = x @ l["in_w"].t()  # (1, 2di)
            u, z = xz[0, :di].float(), xz[0, di:].float()
            win = torch.cat([conv[j, :, 1:], u[:, None]], dim=1)  # (di, K)
            conv[j].copy_(win)
            v = F.silu((win * l["conv_w"]).sum(-1) + l["conv_b"])  # (di)
            xdbl = v.to(dt) @ l["x_w"].t()  # (r + 2N)
            delta = F.softplus((xdbl[:r] @ l["dt_w"].t()).float() + l["dt_b"])  # (di)
            b, c = xdbl[r:r + N].float(), xdbl[r + N:].float()
            h = torch.exp(delta[:, None] * l["A"]) * ssm[j] + (delta * v)[:, None] * b[None, :]
            ssm[j].copy_(h)
            y = (h @ c + l["D"] * v) * F.silu(z)
            out = (y.to(dt) @ l["out_w"].t()).float()[None, :]
            j += 1
        else:
            logits = x.float() @ l["router_w"].t() + l["router_b"]  # (1, E)
            if route_on_host:
                e = int(logits.argmax(-1).item())
                w1, w2 = l["fc1"][e], l["fc2"][e]
            else:
                e = logits.argmax(-1)
                w1, w2 = l["fc1"].index_select(0, e)[0], l["fc2"].index_select(0, e)[0]
            gate = torch.sigmoid(logits.max(-1).values)
            a = x @ w1.t()
            hh = F.gelu(a[:, :f]) * a[:, f:]
            out = (hh @ w2.t()).float() * gate[:, None]
        res = res + out
    hf = F.layer_norm(res, (m["d"],), m["final_w"], m["final_b"], 1e-5).to(dt)
    return (hf @ m["emb"].t()).float().argmax(-1)


def timed(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    s = sorted(times)
    return {
        "tokens": n,
        "tok_s": n / sum(times),
        "ms_p50": 1e3 * s[len(s) // 2],
        "ms_p99": 1e3 * s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2.8b")
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--eager-len", type=int, default=64, help="tokens for the (slow) eager mode")
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_baseline.py: needs a CUDA GPU")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    m = build(a.shape, torch.bfloat16, dev, a.seed)
    report = {"shape": a.shape, "dtype": "bf16", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "modes": {}}
    with torch.no_grad():
        if "eager" in a.modes:
            conv, ssm = new_state(m, dev)
            tok = torch.tensor([1], device=dev)
            holder = [tok]

            def eager():
                holder[0] = step(m, holder[0], conv, ssm, True)
                holder[0].item()

            for _ in range(3):
                eager()
            report["modes"]["eager"] = timed(eager, a.eager_len)
        if "graph" in a.modes:
            conv, ssm = new_state(m, dev)
            tok = torch.tensor([1], device=dev)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):  # warm-up on a side stream, as torch's graph docs ask
                    tok.copy_(step(m, tok, conv, ssm, False))
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                nxt = step(m, tok, conv, ssm, False)
                tok.copy_(nxt)

            def replay():
                graph.replay()
                tok.item()

            for _ in range(3):
                replay()
            torch.cuda.reset_peak_memory_stats()
            report["modes"]["graph"] = timed(replay, a.gen_len)
            report["modes"]["graph"]["peak_alloc_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"torch {report['torch']} on {report['gpu']}, BlackMamba-{a.shape} shapes, bf16, batch 1")
        for k, v in report["modes"].items():
            print(f"  {k:<6} {v['tokens']:>6} tokens  {v['tok_s']:>9.1f} tok/s  p50 {v['ms_p50']:.3f} ms  p99 {v['ms_p99']:.3f} ms")


if __name__ == "__main__":
    main()
