#!/usr/bin/env python3
"""Plain-PyTorch BlackMamba training step: the baseline of `blackmamba bench --finetune`.

Our own straightforward PyTorch version of the training step that `blackmamba finetune` runs
(SPEC §2-§5, §3 training-time routing), on random weights of the released shapes and random
tokens, timed step by step after a warm-up:

  forward   RMSNorm; Mamba: in_proj, causal depthwise conv + SiLU, x_proj, softplus(dt_proj + b),
            the selective scan in f32, D skip, SiLU(z) gate, out_proj; MoE: router (f32, bias),
            experts chosen by Zyphra's Sinkhorn over all tokens of the batch under no-grad,
            gate = sigmoid(router logit of the chosen expert), tokens grouped per expert, GELU-
            gated expert MLP; final LayerNorm, tied head, f32 cross-entropy on every position
  backward  autograd
  update    global-norm clipping to 1.0, torch.optim.AdamW (no decay on A_log, D, norms, biases)

Methods as in `blackmamba finetune`: lora (bf16 frozen base, f32 adapters A (r, in) and B (out, r)
on the targets, the adapter branch computed in f32, scale alpha / rank), router (f32 routers
only) and full (f32 master weights, used through bf16 casts).

The scan has no CUDA kernel here (that is the point of the comparison). Two plain-tensor forms:

  chunked     (default) the sequence is cut into chunks of --chunk tokens; every chunk is scanned
              from a zero state at once (a loop over the chunk's positions on (B, chunks, d_inner,
              N) tensors), the decay products come from a cumulative sum of Δ·A (≤ 0, so stable),
              and the state is carried from chunk to chunk in a second, short loop: about
              chunk + L / chunk small steps instead of L
  sequential  one step per position, as mamba_ssm's selective_scan_ref does

Both keep (B, L, d_inner, N) f32 tensors alive for the backward, gigabytes per Mamba layer at
seq 2,048 and batch 8, so by default every Mamba layer is recomputed in the backward pass
(torch.utils.checkpoint, --checkpoint mamba); --checkpoint none keeps everything (fits at small
batches), --checkpoint all recomputes the MoE layers too.

  python3 bench/torch_finetune.py --shape 2.8b --method lora --seq-len 2048 --batch 8 [--json]
  python3 bench/torch_finetune.py --check      # CPU self-test: scans, checkpointing, gradients
  python3 bench/torch_finetune.py --parity DIR # same loss and gradient norm as blackmamba's trainer
                                               # (DIR from tests/ftbench.rs, see docs/ftbench.md)
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# hidden size, layers, expert hidden size, vocabulary (Mamba and 8-expert MoE layers alternate)
SHAPES = {"tiny": (32, 4, 48, 256), "1.5b": (1152, 30, 3072, 50304), "2.8b": (1472, 36, 3872, 50304)}
TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj", "experts")


def shape_config(name):
    """The config.json fields this script reads, for a named shape."""
    d, layers, f, vocab = SHAPES[name]
    return {
        "hidden_size": d,
        "num_layers": layers,
        "mamba_moe_layers": ["r" if i % 2 == 0 else "8" for i in range(layers)],
        "ffn_hidden_size": f,
        "vocab_size": vocab,
        "state_size": 16,
        "conv_dimension": 4,
        "expansion_factor": 2,
        "layernorm_epsilon": 1e-5,
    }


def check_config(cfg, where):
    """Exits unless the config is one this script builds (the released layout)."""
    if cfg.get("add_bias_linear", False) or not cfg.get("swiglu", True) or cfg.get("expert_activation", "gelu") != "gelu":
        sys.exit(f"{where}: only add_bias_linear false, swiglu true and GELU experts are supported here")
    for code in cfg["mamba_moe_layers"]:
        if code != "r" and not (code.isdigit() and int(code[-1]) >= 2):
            sys.exit(f"{where}: layer code {code!r} is not supported here (use r or an expert count)")


def uniform(shape, bound, g, dev):
    return (torch.rand(*shape, device=dev, generator=g) * 2 - 1) * bound


class Linear(nn.Module):
    """y = x W^T (+ b), W frozen in the compute dtype or an f32 master cast at use; optional LoRA."""

    def __init__(self, out_f, in_f, bound, g, dev, cdt, train, rank=0, alpha=0.0, bias=False):
        super().__init__()
        w = uniform((out_f, in_f), bound, g, dev)
        self.weight = nn.Parameter(w if train else w.to(cdt), requires_grad=train)
        self.bias = nn.Parameter(torch.zeros(out_f, device=dev), requires_grad=train) if bias else None
        self.cdt = cdt
        if rank:
            self.lora_a = nn.Parameter(uniform((rank, in_f), 1 / math.sqrt(in_f), g, dev))
            self.lora_b = nn.Parameter(torch.zeros(out_f, rank, device=dev))
            self.scale = alpha / rank
        else:
            self.lora_a = self.lora_b = None

    def forward(self, x):
        y = x.to(self.cdt) @ self.weight.to(self.cdt).t()
        if self.lora_a is not None:
            y = y + ((x.float() @ self.lora_a.t()) @ self.lora_b.t() * self.scale).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def scan_sequential(v, delta, a_mat, b, c):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t v_t B_t, y_t = h_t C_t: v, delta (B, L, di); a_mat (di, N);
    b, c (B, L, N) -> y (B, L, di). One step per position (selective_scan_ref)."""
    bsz, length, di = v.shape
    da = torch.exp(delta.unsqueeze(-1) * a_mat)  # (B, L, di, N)
    dbu = (delta * v).unsqueeze(-1) * b.unsqueeze(2)  # (B, L, di, N)
    h = v.new_zeros(bsz, di, a_mat.shape[1])
    ys = []
    for t in range(length):
        h = da[:, t] * h + dbu[:, t]
        ys.append((h @ c[:, t].unsqueeze(-1)).squeeze(-1))  # (B, di)
    return torch.stack(ys, 1)


def scan_chunked(v, delta, a_mat, b, c, chunk):
    """The same scan in chunks: local scans of all chunks at once, then the carried state."""
    bsz, length, di = v.shape
    n = a_mat.shape[1]
    nc = -(-length // chunk)
    pad = nc * chunk - length
    if pad:  # Δ = 0 pads: decay 1, input 0, so the padded positions change nothing before them
        v, delta, b, c = (F.pad(x, (0, 0, 0, pad)) for x in (v, delta, b, c))
    shape = (bsz, nc, chunk, di, n)
    log_a = (delta.unsqueeze(-1) * a_mat).view(shape)  # Δ·A ≤ 0
    decay = torch.exp(log_a)
    prod = torch.exp(torch.cumsum(log_a, 2))  # Π of the decays from the chunk start, ≤ 1
    inp = ((delta * v).unsqueeze(-1) * b.unsqueeze(2)).view(shape)
    h = inp[:, :, 0]
    local = [h]
    for t in range(1, chunk):  # every chunk from a zero state, all chunks together
        h = decay[:, :, t] * h + inp[:, :, t]
        local.append(h)
    local = torch.stack(local, 2)  # (B, nc, chunk, di, N)
    carried = v.new_zeros(bsz, di, n)
    starts = []
    for i in range(nc):  # the state entering each chunk
        starts.append(carried)
        carried = prod[:, i, -1] * carried + local[:, i, -1]
    h_all = local + prod * torch.stack(starts, 1).unsqueeze(2)
    y = (h_all @ c.view(bsz, nc, chunk, n, 1)).squeeze(-1)  # (B, nc, chunk, di)
    return y.reshape(bsz, nc * chunk, di)[:, :length]


def sinkhorn_zyphra(cost, tol=1e-4, max_iters=1000):
    """Zyphra's Sinkhorn (SPEC §3) on cost (T, E): the balanced plan, under no-grad, in f64 as
    `blackmamba` computes it (T·E is small)."""
    t, e = cost.shape
    k = torch.exp(2 * cost.double())
    d1 = 1 / (e * k.sum(0))
    for _ in range(max_iters):
        prev = d1
        d0 = 1 / (t * (k @ d1 + 1e-8))
        d1 = 1 / (e * (k.t() @ d0 + 1e-8))
        if (d1 - prev).abs().mean().item() <= tol:  # one host read per iteration, as the reference
            break
    return d0.unsqueeze(1) * k * d1.unsqueeze(0)


class Mamba(nn.Module):
    def __init__(self, cfg, g, dev, cdt, full, lora):
        super().__init__()
        d, layers, n, k = cfg["hidden_size"], cfg["num_layers"], cfg["state_size"], cfg["conv_dimension"]
        di, r = cfg["expansion_factor"] * d, math.ceil(d / 16)
        self.di, self.r, self.n, self.k, self.eps = di, r, n, k, cfg["layernorm_epsilon"]

        def lin(name, out_f, in_f, bound):
            rank, alpha = lora.get(name, (0, 0.0))
            return Linear(out_f, in_f, bound, g, dev, cdt, full, rank, alpha)

        self.norm = nn.Parameter(torch.ones(d, device=dev), requires_grad=full)
        self.in_proj = lin("in_proj", 2 * di, d, 1 / math.sqrt(d))
        self.conv_w = nn.Parameter(torch.rand(di, 1, k, device=dev, generator=g) - 0.5, requires_grad=full)
        self.conv_b = nn.Parameter(torch.zeros(di, device=dev), requires_grad=full)
        self.x_proj = lin("x_proj", r + 2 * n, di, 1 / math.sqrt(di))
        self.dt_proj = lin("dt_proj", di, r, 1 / math.sqrt(r))
        dt = torch.exp(torch.rand(di, device=dev, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_b = nn.Parameter(dt + torch.log(-torch.expm1(-dt)), requires_grad=full)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, device=dev, dtype=torch.float32)).repeat(di, 1), requires_grad=full)
        self.D = nn.Parameter(torch.ones(di, device=dev), requires_grad=full)
        self.out_proj = lin("out_proj", d, di, 1 / math.sqrt(layers) / math.sqrt(di))

    def forward(self, res, scan):
        length = res.shape[1]
        xz = self.in_proj(rmsnorm(res, self.norm, self.eps))  # (B, L, 2di)
        u, z = xz.float().chunk(2, -1)
        conv = F.conv1d(u.transpose(1, 2), self.conv_w, self.conv_b, padding=self.k - 1, groups=self.di)
        v = F.silu(conv[..., :length]).transpose(1, 2)  # (B, L, di) f32
        dt, b, c = self.x_proj(v).float().split([self.r, self.n, self.n], -1)
        delta = F.softplus(self.dt_proj(dt).float() + self.dt_b)  # (B, L, di)
        y = scan(v, delta, -torch.exp(self.A_log), b, c)
        y = (y + self.D * v) * F.silu(z)
        return res + self.out_proj(y).float()


class Moe(nn.Module):
    def __init__(self, cfg, experts, g, dev, cdt, full, lora, train_router):
        super().__init__()
        d, f, layers = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"]
        rank, alpha = lora.get("experts", (0, 0.0))
        self.f, self.e, self.eps = f, experts, cfg["layernorm_epsilon"]
        self.norm = nn.Parameter(torch.ones(d, device=dev), requires_grad=full)
        self.router = Linear(experts, d, 1 / math.sqrt(d), g, dev, torch.float32, full or train_router, bias=True)
        self.fc1 = nn.ModuleList(Linear(2 * f, d, 1 / math.sqrt(d), g, dev, cdt, full, rank, alpha) for _ in range(experts))
        self.fc2 = nn.ModuleList(Linear(d, f, 1 / math.sqrt(layers) / math.sqrt(f), g, dev, cdt, full, rank, alpha) for _ in range(experts))

    def forward(self, res):
        shape = res.shape
        xs = rmsnorm(res, self.norm, self.eps).reshape(-1, shape[-1])  # (T, d) f32
        logits = self.router(xs)  # (T, E) f32
        with torch.no_grad():
            expert = sinkhorn_zyphra(logits.detach()).argmax(-1)  # (T)
        gate = torch.sigmoid(logits).gather(1, expert.unsqueeze(1))  # (T, 1): the router's gradient
        order = torch.argsort(expert)
        counts = torch.bincount(expert, minlength=self.e).tolist()
        grouped = xs[order].split(counts)
        outs = []
        for e, x in enumerate(grouped):
            if x.shape[0]:
                a = self.fc1[e](x)
                outs.append(self.fc2[e](F.gelu(a[:, : self.f]) * a[:, self.f :]))
        y = torch.cat(outs)[torch.argsort(order)].float() * gate  # back to token order
        return res + y.view(shape)


class BlackMamba(nn.Module):
    """Random weights per SPEC §9 for `cfg` (a config.json's fields)."""

    def __init__(self, cfg, cdt, dev, seed, method, targets, rank, alpha, train_router):
        super().__init__()
        d, vocab = cfg["hidden_size"], cfg["vocab_size"]
        g = torch.Generator(device=dev).manual_seed(seed)
        full = method == "full"
        lora = {t: (rank, alpha) for t in targets} if method == "lora" else {}
        self.cdt, self.vocab, self.eps = cdt, vocab, cfg["layernorm_epsilon"]
        self.emb = nn.Parameter((torch.randn(vocab, d, device=dev, generator=g) * 0.02).to(torch.float32 if full else cdt), requires_grad=full)
        self.layers = nn.ModuleList(
            Mamba(cfg, g, dev, cdt, full, lora) if code == "r" else Moe(cfg, int(code[-1]), g, dev, cdt, full, lora, train_router or method == "router")
            for code in cfg["mamba_moe_layers"]
        )
        self.final_w = nn.Parameter(torch.ones(d, device=dev), requires_grad=full)
        self.final_b = nn.Parameter(torch.zeros(d, device=dev), requires_grad=full)

    def loss(self, ids, scan, ckpt):
        """Mean cross-entropy of ids[:, 1:] given ids[:, :-1]."""
        inp, tgt = ids[:, :-1], ids[:, 1:]
        res = self.emb[inp].float()  # (B, L, d) residual stream, f32
        for layer in self.layers:
            is_mamba = isinstance(layer, Mamba)
            args = (res, scan) if is_mamba else (res,)
            if ckpt == "all" or (ckpt == "mamba" and is_mamba):
                res = checkpoint(layer, *args, use_reentrant=False)
            else:
                res = layer(*args)
        h = F.layer_norm(res, (res.shape[-1],), self.final_w, self.final_b, self.eps)
        logits = (h.to(self.cdt) @ self.emb.to(self.cdt).t()).float()  # (B, L, V)
        return F.cross_entropy(logits.view(-1, self.vocab), tgt.reshape(-1))


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = name.endswith(("A_log", ".D", "norm", "bias", "dt_b", "conv_b", "final_w", "final_b"))
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_scan(kind, chunk):
    if kind == "sequential":
        return scan_sequential
    return lambda v, delta, a, b, c: scan_chunked(v, delta, a, b, c, chunk)


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def run(a):
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    cdt = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
    targets = TARGETS if a.targets == "all" else tuple(t for t in a.targets.split(",") if t)
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        sys.exit(f"--targets: unknown {bad}; use {','.join(TARGETS)} or all")
    torch.manual_seed(a.seed)
    if a.config:
        cfg = json.loads(open(a.config).read())
        cfg.setdefault("layernorm_epsilon", 1e-5)
        check_config(cfg, a.config)
    else:
        cfg = shape_config(a.shape)
    model = BlackMamba(cfg, cdt, dev, a.seed, a.method, targets, a.rank, a.alpha, a.train_router)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        sys.exit(f"--method {a.method}: nothing to train")
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    scan = make_scan(a.scan, a.chunk)
    g = torch.Generator(device=dev).manual_seed(a.seed + 1)
    vocab = min(model.vocab, 50277)
    batches = [torch.randint(0, vocab, (a.batch, a.seq_len + 1), device=dev, generator=g) for _ in range(4)]
    if cuda:
        torch.cuda.synchronize()
        after_setup = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    losses, secs = [], []
    for i in range(a.warmup + a.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batches[i % len(batches)], scan, a.checkpoint)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            secs.append(time.perf_counter() - t0)
    tokens = a.batch * a.seq_len
    med = median(secs)
    report = {
        "shape": a.config or a.shape,
        "device": a.device,
        "dtype": a.dtype,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "method": a.method,
        "targets": list(targets) if a.method == "lora" else [],
        "rank": a.rank,
        "alpha": a.alpha,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "tokens_per_step": tokens,
        "scan": a.scan,
        "chunk": a.chunk,
        "checkpoint": a.checkpoint,
        "params_total": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "params_trainable": sum(p.numel() for p in trainable),
        "step_secs": secs,
        "secs_median": med,
        "tok_s": tokens / med,
        "tok_s_mean": tokens * len(secs) / sum(secs),
        "losses": losses,
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        report.update(
            after_setup_alloc_mib=after_setup,
            peak_alloc_mib=torch.cuda.max_memory_allocated() / 2**20,
            peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
            device_used_mib_at_end=(total - free) / 2**20,
        )
    return report


def print_report(r):
    what = f"LoRA rank {r['rank']} on {','.join(r['targets'])}" if r["method"] == "lora" else r["method"]
    print(f"torch {r['torch']} on {r['gpu'] or r['device']} ({torch.get_num_threads()} threads): {r['shape']} shapes, {r['dtype']}, {what}, "
          f"{r['params_trainable'] / 1e6:.2f}M of {r['params_total'] / 1e6:.1f}M parameters trainable")
    print(f"scan {r['scan']} (chunk {r['chunk']}), recompute {r['checkpoint']}; batch {r['batch']} x seq {r['seq_len']}: "
          f"{len(r['step_secs'])} timed steps, median {1e3 * r['secs_median']:.1f} ms, {r['tok_s']:.0f} tok/s (mean {r['tok_s_mean']:.0f})")
    print("loss per step: " + " ".join(f"{x:.3f}" for x in r["losses"]))
    if "peak_alloc_mib" in r:
        print(f"GPU memory (MiB): allocated after setup {r['after_setup_alloc_mib']:.0f}, peak allocated {r['peak_alloc_mib']:.0f}, "
              f"peak reserved {r['peak_reserved_mib']:.0f}, device in use at the end {r['device_used_mib_at_end']:.0f}")


def self_check():
    """CPU, tiny shapes: the chunked scan equals the sequential one in f64 (values and gradients),
    recomputation changes neither the loss nor the gradients (bit for bit), every trainable
    tensor gets a gradient, and a few LoRA steps lower the loss."""
    torch.manual_seed(0)
    ok = True

    def report(name, err, tol):
        nonlocal ok
        good = err <= tol
        ok &= good
        print(f"check {name}: max |diff| {err:.2e} (tolerance {tol:.0e}) {'ok' if good else 'FAILED'}")

    bsz, length, di, n = 2, 37, 6, 4
    dd = torch.float64
    v = torch.randn(bsz, length, di, dtype=dd, requires_grad=True)
    delta = (torch.rand(bsz, length, di, dtype=dd) * 0.5).requires_grad_()
    a_mat = (-torch.rand(di, n, dtype=dd) * 3).requires_grad_()
    b = torch.randn(bsz, length, n, dtype=dd, requires_grad=True)
    c = torch.randn(bsz, length, n, dtype=dd, requires_grad=True)
    inputs = (v, delta, a_mat, b, c)
    y_ref = scan_sequential(*inputs)
    w = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad((y_ref * w).sum(), inputs)
    for chunk in (1, 5, 8, 64):
        y = scan_chunked(*inputs, chunk)
        g = torch.autograd.grad((y * w).sum(), inputs)
        report(f"chunked scan (chunk {chunk}) = sequential", (y - y_ref).abs().max().item(), 1e-10)
        report(f"chunked scan (chunk {chunk}) gradients", max((x - r).abs().max().item() for x, r in zip(g, g_ref)), 1e-10)
    # one step of the recurrence by hand
    h = torch.zeros(bsz, di, n, dtype=dd)
    for t in range(3):
        h = torch.exp(delta[:, t, :, None] * a_mat) * h + (delta[:, t] * v[:, t])[..., None] * b[:, t, None, :]
    report("scan = the recurrence at t = 2", ((h * c[:, 2, None, :]).sum(-1) - y_ref[:, 2]).abs().max().item(), 1e-12)

    for method in ("lora", "full", "router"):
        grads = {}
        for ckpt in ("none", "all"):
            m = BlackMamba(shape_config("tiny"), torch.float32, torch.device("cpu"), 3, method, TARGETS, 4, 8.0, False)
            if method == "lora":
                for p in m.parameters():  # non-zero B so every adapter gets a gradient
                    if p.requires_grad and p.dim() == 2 and not p.abs().sum():
                        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
            ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
            loss = m.loss(ids, make_scan("chunked", 4), ckpt)
            loss.backward()
            named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            grads[ckpt] = (loss.item(), [(n, torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in named])
        (l0, g0), (l1, g1) = grads["none"], grads["all"]
        report(f"{method}: loss with recomputation", abs(l0 - l1), 0.0)
        report(f"{method}: gradients with recomputation", max((x - y).abs().max().item() for (_, x), (_, y) in zip(g0, g1)), 0.0)
        missing = [n for n, x in g0 if not x.abs().sum() > 0]
        ok &= not missing
        print(f"check {method}: {len(g0) - len(missing)} of {len(g0)} trainable tensors got a gradient {'ok' if not missing else 'FAILED: ' + ', '.join(missing[:4])}")

    m = BlackMamba(shape_config("tiny"), torch.float32, torch.device("cpu"), 1, "lora", TARGETS, 4, 8.0, False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = m.loss(ids, make_scan("chunked", 8), "mamba")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    good = losses[-1] < losses[0] - 0.1
    ok &= good
    print(f"check lora training lowers the loss: {losses[0]:.3f} -> {losses[-1]:.3f} {'ok' if good else 'FAILED'}")
    return ok


def read_safetensors(path):
    """name -> tensor of a .safetensors file (F32, BF16 or F16), read without the safetensors package."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    kinds = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in kinds:
            sys.exit(f"{path}: tensor {name} has dtype {info['dtype']}; F32, BF16 or F16 expected")
        start, end = info["data_offsets"]
        data = bytearray(raw[8 + n + start : 8 + n + end])
        out[name] = torch.frombuffer(data, dtype=kinds[info["dtype"]]).reshape(info["shape"]).float() if data else torch.zeros(info["shape"])
    return out


def load_weights(model, tensors):
    """Puts a blackmamba / release checkpoint's tensors (by their names) into `model`."""
    names = {"embedding.word_embeddings.weight": model.emb, "decoder.final_layernorm.weight": model.final_w, "decoder.final_layernorm.bias": model.final_b}
    for i, layer in enumerate(model.layers):
        p = f"decoder.layers.{i}"
        names[f"{p}.norm.weight"] = layer.norm
        m = f"{p}.mixer"
        if isinstance(layer, Mamba):
            names.update({
                f"{m}.in_proj.weight": layer.in_proj.weight, f"{m}.conv1d.weight": layer.conv_w, f"{m}.conv1d.bias": layer.conv_b,
                f"{m}.x_proj.weight": layer.x_proj.weight, f"{m}.dt_proj.weight": layer.dt_proj.weight, f"{m}.dt_proj.bias": layer.dt_b,
                f"{m}.A_log": layer.A_log, f"{m}.D": layer.D, f"{m}.out_proj.weight": layer.out_proj.weight,
            })
        else:
            names.update({f"{m}.router.weight": layer.router.weight, f"{m}.router.bias": layer.router.bias})
            for e in range(layer.e):
                names[f"{m}.local_experts.{e}.linear_fc1.weight"] = layer.fc1[e].weight
                names[f"{m}.local_experts.{e}.linear_fc2.weight"] = layer.fc2[e].weight
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        sys.exit(f"checkpoint does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in names.items():
            t = tensors[name]
            if t.numel() != param.numel():
                sys.exit(f"checkpoint tensor {name} has shape {list(t.shape)}, expected {list(param.shape)}")
            param.copy_(t.reshape(param.shape))


def parity(folder):
    """Training loss and gradient norm of every weight, on a blackmamba model folder and a batch
    that `blackmamba` measured (parity.json: ids, loss, grad_norm), in f32 on the CPU."""
    from pathlib import Path

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("layernorm_epsilon", 1e-5)
    check_config(cfg, folder / "config.json")
    want = json.loads((folder / "parity.json").read_text())
    model = BlackMamba(cfg, torch.float32, torch.device("cpu"), 0, "full", TARGETS, 0, 0.0, False)
    load_weights(model, read_safetensors(folder / "model.safetensors"))
    ids = torch.tensor(want["ids"], dtype=torch.long)
    loss = model.loss(ids, make_scan("chunked", 8), "none")
    loss.backward()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    ok = True
    for name, got, ref, tol in (("loss", loss.item(), want["loss"], 1e-6), ("gradient norm", norm, want["grad_norm"], 1e-6)):
        rel = abs(got - ref) / max(abs(ref), 1e-12)
        good = rel <= tol
        ok &= good
        print(f"parity {name}: torch {got:.7g}, blackmamba {ref:.7g}, relative difference {rel:.1e} (tolerance {tol:.0e}) {'ok' if good else 'FAILED'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2.8b")
    ap.add_argument("--config", metavar="FILE", help="a config.json to take the shapes from instead of --shape")
    ap.add_argument("--method", choices=["lora", "router", "full"], default="lora")
    ap.add_argument("--targets", default="all", help="LoRA targets, comma-separated, or all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--train-router", action="store_true")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--scan", choices=["chunked", "sequential"], default="chunked")
    ap.add_argument("--chunk", type=int, default=64, help="chunk length of the chunked scan")
    ap.add_argument("--checkpoint", choices=["none", "mamba", "all"], default="mamba", help="layers recomputed in the backward")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="run the CPU self-test and exit")
    ap.add_argument("--parity", metavar="DIR", help="compare loss and gradient norm with blackmamba's on DIR (see parity())")
    a = ap.parse_args()
    if a.check:
        sys.exit(0 if self_check() else 1)
    if a.parity:
        sys.exit(0 if parity(a.parity) else 1)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("torch_finetune.py: no CUDA GPU; use --device cpu (small shapes) or --check")
    if a.steps < 1 or a.seq_len < 1 or a.batch < 1 or a.chunk < 1:
        sys.exit("--steps, --seq-len, --batch and --chunk must be at least 1")
    if a.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    r = run(a)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)


if __name__ == "__main__":
    main()
