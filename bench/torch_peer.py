#!/usr/bin/env python3
"""The PyTorch peer of `prism bench attention` (and of the training step).

The same three architectures as Prism, written from DESIGN.md §1 (not from
Prism's code, and not from timm, so that the comparison is against what a
PyTorch user would write), timed the same way: CUDA events around each
iteration after warm-up, the median reported, two input sets alternating.

  --mode attention  forward + backward of one attention sublayer (the
                    projections, the router, the attention core; no LayerNorm,
                    no MLP: what DESIGN.md §5 counts) at the shapes and batch
                    of `prism bench attention`: the dense chvit block through
                    F.scaled_dot_product_attention, and moevit at each k three
                    ways: `padded` (queries gathered per (image, channel) group,
                    padded to the largest group, one batched SDPA), `naive`
                    (every token attends to every channel, the unselected ones
                    are weighted 0), and `flex` (FlexAttention over the sorted
                    slots with a block mask).
  --mode step       a whole training step (forward, backward, AdamW) of each
                    configs/*.json model, in images/s.

Without --config, attention mode runs the shapes of the README: JUMP-CP
(224², C=8, P=16 and P=8) and So2Sat (32², C=18, P=8), D=384, 6 heads.
Every row also prints as one JSON line at the end.

Runs on torch >= 2.0 (the GPU machine has 2.11). Older torch (a Debian CPU
build) runs the CPU smoke test (--device cpu) with SDPA spelled out, and
reports FlexAttention and torch.compile as failed.
"""

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Configs: the JSON files of configs/, the keys and defaults of engine/config.h
# ---------------------------------------------------------------------------

MODEL_DEFAULTS = dict(arch="moevit", image=32, channels=4, patch=8, dim=64, depth=2, heads=4,
                      mlp_ratio=4.0, num_classes=4, top_k=2, combine="softmax", aux="switch",
                      aux_coef=0.01, z_loss_coef=0.0, drop_path=0.0, channel_embed_std=0.02)
TRAIN_DEFAULTS = dict(batch=64, lr=5e-4, weight_decay=0.05, beta1=0.9, beta2=0.999, eps=1e-8)


def load_config(path, sets=()):
    """The model and train sections of a config, defaults filled in; `sets`
    are prism's --set overrides (the value is JSON when it parses)."""
    with open(path) as f:
        j = json.load(f)
    for s in sets:
        name, eq, text = s.partition("=")
        section, _, key = name.strip().partition(".")
        if not eq or not key:
            raise SystemExit(f"--set {s}: expected section.key=value")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        j.setdefault(section, {})[key] = value
    model = dict(MODEL_DEFAULTS, **j.get("model", {}))
    train = dict(TRAIN_DEFAULTS, **j.get("train", {}))
    if model["dim"] % model["heads"]:
        raise SystemExit(f"{path}: model.dim {model['dim']} is not divisible by model.heads {model['heads']}")
    return model, train


def num_patches(m):
    return (m["image"] // m["patch"]) ** 2


def hidden(m):
    return int(math.floor(m["dim"] * m["mlp_ratio"] + 0.5))  # C's lround


# ---------------------------------------------------------------------------
# FLOPs: DESIGN.md §5, as engine/flops.cpp counts them (2 per multiply-add)
# ---------------------------------------------------------------------------

def attention_flops(m, arch, k=None, subset=None):
    """One block's attention for one image, all channels unless `subset`."""
    s = subset or m["channels"]
    C, N, D, Hd = m["channels"], num_patches(m), m["dim"], m["heads"]
    T = s * N
    if arch == "moevit":
        k = min(k or m["top_k"], s)
        f = 8 * T * D * D + 2 * T * D * C + 4 * T * k * N * D + T * k * N * Hd
        return f + 4 * D * D + 4 * T * D + T * Hd  # the CLS row
    tokens = N + 1 if arch == "vit" else T + 1
    return 2 * tokens * D * 4 * D + 4 * tokens * tokens * D + tokens * tokens * Hd


def train_step_flops(m):
    """Forward + backward (3x forward) of the whole model, per image."""
    C, N, D, P = m["channels"], num_patches(m), m["dim"], m["patch"]
    arch = m["arch"]
    tokens = N + 1 if arch == "vit" else C * N + 1
    block = attention_flops(m, arch) + 2 * tokens * D * hidden(m) * 2 + 2 * 8 * tokens * D
    embed = 2 * N * C * P * P * D if arch == "vit" else 2 * C * N * P * P * D
    forward = embed + m["depth"] * block + 2 * D * m["num_classes"]
    return 3 * forward


# The default batch of `prism bench attention` (bench/attention.cpp,
# attention_bench_bytes_per_image and default_attention_batch; the test
# BenchAttention.DefaultBatch pins its values): Prism's device buffers per
# image for the dense block (k = 0) and each moevit k, and the largest batch
# up to 256 whose biggest variant fits in 8 GiB.
def prism_bytes_per_image(m, k):
    C, N, D, Hd = m["channels"], num_patches(m), m["dim"], m["heads"]
    T = C * N
    L = T + 1
    if k == 0:
        floats = 14 * L * D + 2 * L * Hd
    else:
        floats = (10 * L * D + 2 * L * C + 2 * T * C + 5 * T * k + T + C + 4 * T * D + 4 * T * k * D
                  + T * k * Hd + Hd * T + 2 * T * D + T * C * Hd)
    return 4.0 * floats


def prism_default_batch(m, ks):
    per_image = max(prism_bytes_per_image(m, k) for k in [0] + list(ks))
    return int(max(1, min(256, math.floor(8.0 * (1 << 30) / per_image))))


def parse_k_list(text, channels):
    ks = []
    for item in text.split(","):
        k = channels if item in ("C", "c") else int(item)
        if not 1 <= k <= channels:
            raise SystemExit(f"--k {text}: k = {k} is outside 1..{channels}")
        if k not in ks:
            ks.append(k)
    return ks


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

HAVE_SDPA = hasattr(F, "scaled_dot_product_attention")


def sdpa(q, k, v):
    """softmax(q·kᵀ/√dh)·v over the last two dimensions."""
    if HAVE_SDPA:
        return F.scaled_dot_product_attention(q, k, v)
    # torch < 2.0 (the CPU smoke test): the same math, scores materialized
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(-1), v)


class DenseAttention(nn.Module):
    """vit / chvit: multi-head self-attention over the whole sequence."""

    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, y, S=None, N=None):
        B, L, D = y.shape
        H = self.heads
        q, k, v = self.qkv(y).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = sdpa(q, k, v).transpose(1, 2).reshape(B, L, D)
        return self.proj(o), None


def group_slots(experts, nS):
    """Sorts the (token, slot) pairs by group g = image·nS + channel position,
    stably (a group's slots stay in token order), as Prism's dispatch does.
    Returns the order (sorted slot -> slot), its inverse, and each sorted
    slot's group."""
    B, T, k = experts.shape
    g = (torch.arange(B, device=experts.device).view(B, 1, 1) * nS + experts).reshape(-1)
    g_sorted, order = torch.sort(g, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse, g_sorted


def routed_padded(qp, kk, vv, experts, heads):
    """Per (image, channel) group: its gathered queries, padded to the largest
    group (rounded up to 64 so that a few sizes recur, which torch.compile and
    the SDPA kernels like), against that channel's N keys: one batched SDPA.
    The padding is on the query side, so every key is valid and no attention
    mask is needed: pad rows compute something and are never read back. The
    largest group size is data, read on the host (one synchronization per
    call, as any padded implementation pays)."""
    B, T, D = qp.shape
    nS, N = kk.shape[1], kk.shape[2]
    k = experts.shape[-1]
    dh = D // heads
    order, inverse, g_sorted = group_slots(experts, nS)
    counts = torch.bincount(g_sorted, minlength=B * nS)
    starts = torch.cumsum(counts, 0) - counts
    row = torch.arange(g_sorted.numel(), device=qp.device) - starts[g_sorted]  # row within its group
    G = int(counts.max())
    G = -(-G // 64) * 64
    qflat = qp.reshape(B * T, D)
    qbuf = qflat.new_zeros(B * nS, G, D).index_put((g_sorted, row), qflat[order // k])
    o = sdpa(qbuf.view(B * nS, G, heads, dh).transpose(1, 2),
             kk.reshape(B * nS, N, heads, dh).transpose(1, 2),
             vv.reshape(B * nS, N, heads, dh).transpose(1, 2))
    og = o.transpose(1, 2).reshape(B * nS, G, D)[g_sorted, row]  # the real rows, in sorted order
    return og[inverse].view(B, T, k, D)


def routed_naive(qp, kk, vv, experts, heads):
    """Every token against every channel's keys (k = C work whatever k is);
    the caller's combine weights are 0 for the channels not selected. Returns
    [B, T, nS, D]: one output per channel, not per slot."""
    B, T, D = qp.shape
    nS, N = kk.shape[1], kk.shape[2]
    dh = D // heads
    q = qp.view(B, T, heads, dh).transpose(1, 2)
    q = q.unsqueeze(1).expand(B, nS, heads, T, dh).reshape(B * nS, heads, T, dh)
    o = sdpa(q, kk.reshape(B * nS, N, heads, dh).transpose(1, 2),
             vv.reshape(B * nS, N, heads, dh).transpose(1, 2))
    return o.view(B, nS, heads, T, dh).permute(0, 3, 1, 2, 4).reshape(B, T, nS, D)


_flex = {}


def routed_flex(qp, kk, vv, experts, heads):
    """FlexAttention: per image, the T·k slots sorted by channel form the query
    sequence and the image's nS·N patch keys the key sequence; a slot sees
    only its channel's N keys, so its softmax is that channel's MHA. Sorting
    makes the mask block-diagonal, and the block mask skips the rest."""
    if "fn" not in _flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        import inspect
        _flex["fn"] = torch.compile(flex_attention)  # uncompiled, flex runs an unfused reference
        _flex["mask"] = create_block_mask
        _flex["compile_mask"] = "_compile" in inspect.signature(create_block_mask).parameters
    B, T, D = qp.shape
    nS, N = kk.shape[1], kk.shape[2]
    k = experts.shape[-1]
    dh = D // heads
    order, inverse, g_sorted = group_slots(experts, nS)
    # Each image holds exactly T·k slots, so image b's sorted slots are rows
    # b·T·k .. (b+1)·T·k: a plain [B, T·k] query sequence.
    chan = (g_sorted % nS).view(B, T * k)
    q = qp.reshape(B * T, D)[order // k].view(B, T * k, heads, dh).transpose(1, 2)
    kh = kk.reshape(B, nS * N, heads, dh).transpose(1, 2)
    vh = vv.reshape(B, nS * N, heads, dh).transpose(1, 2)
    dtype = torch.promote_types(q.dtype, kh.dtype)  # flex wants one dtype; autocast does not cover it
    q, kh, vh = q.to(dtype), kh.to(dtype), vh.to(dtype)

    def same_channel(b, h, q_idx, kv_idx):
        return chan[b, q_idx] == kv_idx // N

    extra = {"_compile": True} if _flex["compile_mask"] else {}
    mask = _flex["mask"](same_channel, B, None, T * k, nS * N, device=qp.device, **extra)
    o = _flex["fn"](q, kh, vh, block_mask=mask)
    return o.transpose(1, 2).reshape(B * T * k, D)[inverse].view(B, T, k, D)


class ChannelExperts(nn.Module):
    """One linear layer per channel, weight [C, out, in] and bias [C, out] as
    the checkpoint stores them (attn.k.weight, ...)."""

    def __init__(self, C, D):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(C, D, D))
        self.bias = nn.Parameter(torch.zeros(C, D))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x4, S):
        # x4 [B, nS, N, D]: the tokens of channel position s use expert S[s]
        out = torch.einsum("bsnd,sed->bsne", x4, self.weight.index_select(0, S))
        return out + self.bias.index_select(0, S).to(out.dtype).view(1, -1, 1, out.shape[-1])


class MoEAttention(nn.Module):
    """moevit's channel-MoE attention, DESIGN.md §1."""

    def __init__(self, C, D, heads, k, combine="softmax", aux="switch", aux_coef=0.01, z_coef=0.0,
                 impl="padded"):
        super().__init__()
        self.C, self.heads, self.top_k, self.impl = C, heads, k, impl
        self.combine, self.aux, self.aux_coef, self.z_coef = combine, aux, aux_coef, z_coef
        self.router = nn.Linear(D, C)
        self.q = nn.Linear(D, D)
        self.k = ChannelExperts(C, D)
        self.v = ChannelExperts(C, D)
        self.proj = nn.Linear(D, D)

    def forward(self, y, S, N):
        """y [B, 1 + |S|·N, D] (CLS, then the patches channel-major), S the
        sorted channels present. Returns the sublayer's output and its
        auxiliary loss (load balance + z-loss)."""
        B, L, D = y.shape
        nS, C, H = S.numel(), self.C, self.heads
        T = nS * N
        patches = y[:, 1:]
        # Router: softmax over the channels present (at least fp32, DESIGN.md §7).
        z = self.router(patches)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if nS < C:
            absent = torch.ones(C, dtype=torch.bool, device=y.device)
            absent[S] = False
            z = z.masked_fill(absent, float("-inf"))
        p = z.softmax(-1)
        pS = p.index_select(-1, S)                       # [B, T, nS]
        k = min(self.top_k, nS)
        # top-k, ties to the lower channel: a stable sort keeps index order
        experts = torch.sort(pS, dim=-1, descending=True, stable=True).indices[..., :k]
        R = pS.gather(-1, experts)
        if self.combine == "renorm":
            R = R / R.sum(-1, keepdim=True)

        x4 = patches.reshape(B, nS, N, D)
        kk = self.k(x4, S)  # [B, nS, N, D]
        vv = self.v(x4, S)
        q = self.q(y)
        qp = q[:, 1:]
        if self.impl == "naive":
            o = routed_naive(qp, kk, vv, experts, H)          # [B, T, nS, D]
            weights = torch.zeros_like(pS).scatter(-1, experts, R)
            a = torch.einsum("btsd,bts->btd", o, weights.to(o.dtype))
        else:
            routed = routed_flex if self.impl == "flex" else routed_padded
            og = routed(qp, kk, vv, experts, H)               # [B, T, k, D]
            a = torch.einsum("btjd,btj->btd", og, R.to(og.dtype))
        # CLS attends densely to every patch key of its image (it has no key).
        dh = D // H
        cls = sdpa(q[:, :1].reshape(B, 1, H, dh).transpose(1, 2),
                   kk.reshape(B, T, H, dh).transpose(1, 2),
                   vv.reshape(B, T, H, dh).transpose(1, 2)).transpose(1, 2).reshape(B, 1, D)
        out = self.proj(torch.cat([cls, a.to(cls.dtype)], 1))
        return out, self.aux_loss(p, pS, z, experts, S, k)

    def aux_loss(self, p, pS, z, experts, S, k):
        nS = S.numel()
        loss = p.new_zeros(())
        if self.aux != "none" and self.aux_coef:
            mass = pS.reshape(-1, nS).sum(0)            # Σ_t p[t, c]
            tokens = pS.numel() // nS
            if self.aux == "switch":
                # α·|S|·Σ f_c·P_c, f_c = slots routed to c / (T·k): no gradient
                f = torch.bincount(experts.reshape(-1), minlength=nS).to(p.dtype) / (tokens * k)
                loss = loss + self.aux_coef * nS * (f * mass / tokens).sum()
            else:  # importance: CV² of the mass, population variance
                mu = mass.mean()
                loss = loss + self.aux_coef * ((mass - mu) ** 2).mean() / mu ** 2
        if self.z_coef:
            lse = torch.logsumexp(z.index_select(-1, S), -1)
            loss = loss + self.z_coef * (lse ** 2).mean()
        return loss


# ---------------------------------------------------------------------------
# Whole models (step mode)
# ---------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, m, attn, drop_path):
        super().__init__()
        D = m["dim"]
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(D, hidden(m))
        self.mlp.fc2 = nn.Linear(hidden(m), D)
        self.drop_path = drop_path

    def dropped(self, branch):
        """Stochastic depth: a dropped sample loses the branch, a kept one is
        scaled by 1/keep."""
        if not self.training or self.drop_path == 0:
            return branch
        keep = 1 - self.drop_path
        mask = torch.empty(branch.shape[0], 1, 1, device=branch.device).bernoulli_(keep)
        return branch * (mask / keep).to(branch.dtype)

    def forward(self, x, S, N):
        a, aux = self.attn(self.norm1(x), S, N)
        x = x + self.dropped(a)
        x = x + self.dropped(self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)))))  # exact erf GELU
        return x, aux


class Net(nn.Module):
    def __init__(self, m, impl="padded"):
        super().__init__()
        self.arch = m["arch"]
        C, D, P, N = m["channels"], m["dim"], m["patch"], num_patches(m)
        vit = self.arch == "vit"
        self.patch_embed = nn.Conv2d(C if vit else 1, D, P, stride=P)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 1e-6)
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + N, D))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.channel_embed = None
        if not vit:
            self.channel_embed = nn.Parameter(torch.empty(C, D))
            nn.init.trunc_normal_(self.channel_embed, std=m["channel_embed_std"])
        depth = m["depth"]
        blocks = []
        for i in range(depth):
            if self.arch == "moevit":
                attn = MoEAttention(C, D, m["heads"], m["top_k"], m["combine"], m["aux"], m["aux_coef"],
                                    m["z_loss_coef"], impl)
            else:
                attn = DenseAttention(D, m["heads"])
            rate = m["drop_path"] * i / (depth - 1) if depth > 1 else m["drop_path"]
            blocks.append(Block(m, attn, rate))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, m["num_classes"])
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
        self.N = N

    def forward(self, images, S):
        B, C, Himg, Wimg = images.shape
        if self.arch == "vit":
            x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        else:
            # one 1-channel convolution per present channel, channel-major tokens
            nS = S.numel()
            x = self.patch_embed(images.index_select(1, S).reshape(B * nS, 1, Himg, Wimg))
            x = x.flatten(2).transpose(1, 2).reshape(B, nS, self.N, -1)
            x = x + self.pos_embed[:, None, 1:] + self.channel_embed.index_select(0, S)[None, :, None]
            x = x.reshape(B, nS * self.N, -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, x.to(cls.dtype)], 1)
        aux = x.new_zeros((), dtype=torch.float32)
        for blk in self.blocks:
            x, a = blk(x, S, self.N)
            if a is not None:
                aux = aux + a
        logits = self.head(self.norm(x[:, 0]))
        return logits, aux / len(self.blocks)


def adamw(model, t, device):
    """AdamW with decoupled weight decay on tensors of rank >= 2 only (biases,
    LayerNorms, cls_token... are not decayed: DESIGN/engine/model.cpp)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith(".bias")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    kw = dict(lr=t["lr"], betas=(t["beta1"], t["beta2"]), eps=t["eps"])
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (TypeError, RuntimeError):
            pass
    return torch.optim.AdamW(groups, **kw), "foreach/default"


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def time_iterations(fn, warmup, iters, device):
    """fn(i) runs iteration i; returns the milliseconds of the timed ones."""
    for i in range(warmup):
        fn(i)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        stops = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(warmup + i)
            stops[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(starts, stops)]
    ms = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(warmup + i)
        ms.append(1e3 * (time.perf_counter() - t0))
    return ms


def ieee_fp32():
    """fp32 means fp32, as prism's cuBLAS calls (CUBLAS_DEFAULT_MATH, no TF32).
    torch >= 2.9 has fp32_precision settings and warns about (or refuses a mix
    with) the older allow_tf32 flags, so only one of the two is used."""
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def short_error(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def free_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / (1 << 30) if device.type == "cuda" else 0.0


def maybe_compile(module, args):
    if not args.compile:
        return module
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"torch.compile does not exist in torch {torch.__version__}")
    return torch.compile(module)


# ---------------------------------------------------------------------------
# Attention mode
# ---------------------------------------------------------------------------

def bench_attention_shape(m, ks, impls, args, device):
    C, N, D, H = m["channels"], num_patches(m), m["dim"], m["heads"]
    L = 1 + C * N
    batch = args.batch or prism_default_batch(m, ks)
    print(f"attention: image {m['image']}, C={C}, P={m['patch']}: N={N}, dense sequence {L}; D={D}, "
          f"{H} heads; |S|=C; batch {batch}; {args.dtype}{', compiled' if args.compile else ''}; "
          f"{args.warmup} warm-up + {args.iters} timed iterations (median)", file=sys.stderr)
    S = torch.arange(C, device=device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    # Two input sets (LN1's output and the upstream gradient), alternated.
    ys = [torch.randn(batch, L, D, generator=gen).to(device).requires_grad_() for _ in range(2)]
    dys = [torch.randn(batch, L, D, generator=gen).to(device) for _ in range(2)]
    per_block = 1.0 / max(1, m["depth"])  # the model's aux losses are means over blocks
    dense_flops = attention_flops(m, "chvit")

    variants = [("chvit", 0, "sdpa")] + [("moevit", k, impl) for k in ks for impl in impls]
    rows = []
    dense_ms = None
    for arch, k, impl in variants:
        row = dict(bench="attention", impl="torch-" + impl, variant=arch, k=k or None, batch=batch,
                   precision=args.dtype, compiled=bool(args.compile), iters=args.iters, warmup=args.warmup,
                   image=m["image"], channels=C, patch=m["patch"], dim=D, heads=H, combine=m["combine"])
        flops = attention_flops(m, arch, k)
        row["train_gflop"] = 3 * flops * batch / 1e9
        row["ideal_speedup"] = dense_flops / flops
        free_memory(device)
        mod = run = step = dy_cast = None
        try:
            torch.manual_seed(args.seed)
            if arch == "chvit":
                mod = DenseAttention(D, H)
            else:
                mod = MoEAttention(C, D, H, k, m["combine"], m["aux"], m["aux_coef"], m["z_loss_coef"], impl)
            mod = mod.to(device)
            run = maybe_compile(mod, args)

            dy_cast = {}  # the upstream gradient in the output's dtype, cast once

            def step(i):
                y = ys[i % 2]
                y.grad = None
                for p in mod.parameters():
                    p.grad = None
                with autocast(device, args.dtype):
                    out, aux = run(y, S, N)
                key = (i % 2, out.dtype)
                if key not in dy_cast:
                    dy_cast[key] = dys[i % 2].to(out.dtype)
                if aux is None:
                    out.backward(dy_cast[key])
                else:
                    torch.autograd.backward([out, aux * per_block], [dy_cast[key], None])

            ms = time_iterations(step, args.warmup, args.iters, device)
            if not all(bool(torch.isfinite(y.grad).all()) for y in ys if y.grad is not None):
                raise RuntimeError("the input gradient is not finite")
            row["ms"] = statistics.median(ms)
            row["ms_min"], row["ms_max"] = min(ms), max(ms)
            row["tflops"] = row["train_gflop"] / row["ms"]
            if arch == "chvit":
                dense_ms = row["ms"]
            row["speedup"] = dense_ms / row["ms"] if dense_ms else None
            row["peak_gib"] = peak_gib(device)
        except Exception as e:  # an OOM or an unsupported feature: report it, go on
            row["error"] = "failed: " + short_error(e)
            if args.verbose:
                traceback.print_exc()
        finally:
            mod = run = step = dy_cast = None  # the next variant gets the memory
            for y in ys:
                y.grad = None
        name = f"{arch}{f' k={k}' if k else ''} {impl}"
        status = row.get("error") or f"{row['ms']:.3f} ms, {row['tflops']:.2f} TFLOP/s"
        print(f"attention: {name}: {status}", file=sys.stderr)
        rows.append(row)
    del ys, dys
    return rows


def attention_table(rows):
    lines = [f"{'variant':<24} {'ms fwd+bwd':>12} {'(min)':>10} {'TFLOP/s':>9} {'speedup':>9} {'ideal':>9} {'GiB':>8}"]
    for r in rows:
        name = f"{r['variant']}{' k=%d' % r['k'] if r['k'] else ''} {r['impl'][6:]}"
        if "error" in r:
            lines.append(f"{name:<24} {r['error']}")
            continue
        sp = f"{r['speedup']:8.2f}x" if r.get("speedup") else f"{'-':>9}"
        lines.append(f"{name:<24} {r['ms']:12.3f} {r['ms_min']:10.3f} {r['tflops']:9.2f} {sp} "
                     f"{r['ideal_speedup']:8.2f}x {r['peak_gib']:8.2f}")
    return "\n".join(lines)


# The shapes of the README's commands, as `prism bench attention` gets them.
DEFAULT_ATTENTION_SHAPES = [("configs/jumpcp_chvit.json", []),
                            ("configs/jumpcp_chvit.json", ["model.patch=8"]),
                            ("configs/so2sat_chvit.json", [])]


def find_config(path, root):
    """A config path as given, else relative to the Prism checkout."""
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(root, path)


def mode_attention(args, device):
    impls = [s for s in args.impl.split(",") if s]
    for impl in impls:
        if impl not in ("padded", "naive", "flex"):
            raise SystemExit(f"--impl {args.impl}: {impl} is not padded, naive or flex")
    shapes = [(args.config, args.set)] if args.config else DEFAULT_ATTENTION_SHAPES
    all_rows = []
    for path, sets in shapes:
        m, _ = load_config(find_config(path, args.root), sets)
        ks = parse_k_list(args.k, m["channels"])
        rows = bench_attention_shape(m, ks, impls, args, device)
        print(f"\n{path} {' '.join('--set ' + s for s in sets)}".rstrip())
        print(attention_table(rows))
        all_rows += rows
    return all_rows


# ---------------------------------------------------------------------------
# Step mode
# ---------------------------------------------------------------------------

def bench_step_config(path, m, t, args, device):
    C, img = m["channels"], m["image"]
    batch = args.batch or t["batch"]
    row = dict(bench="step", impl="torch" + (f"-{args.moe_impl}" if m["arch"] == "moevit" else ""),
               config=os.path.basename(path), variant=m["arch"], k=m["top_k"] if m["arch"] == "moevit" else None,
               precision=args.dtype, compiled=bool(args.compile), iters=args.iters, warmup=args.warmup,
               image=img, channels=C, patch=m["patch"], dim=m["dim"], depth=m["depth"], heads=m["heads"])
    flops = train_step_flops(m)
    while True:
        free_memory(device)
        model = opt = None
        try:
            torch.manual_seed(args.seed)
            model = Net(m, args.moe_impl).to(device).train()
            opt, row["adamw"] = adamw(model, t, device)
            run = maybe_compile(model, args)
            S = torch.arange(C, device=device)  # all channels: HCS would vary the shapes
            gen = torch.Generator(device="cpu").manual_seed(args.seed)
            inputs = [(torch.randn(batch, C, img, img, generator=gen).to(device),
                       torch.randint(0, m["num_classes"], (batch,), generator=gen).to(device)) for _ in range(2)]

            def step(i):
                images, labels = inputs[i % 2]
                opt.zero_grad(set_to_none=True)
                with autocast(device, args.dtype):
                    logits, aux = run(images, S)
                loss = F.cross_entropy(logits.float(), labels) + aux
                loss.backward()
                opt.step()

            ms = time_iterations(step, args.warmup, args.iters, device)
            row["batch"] = batch
            row["ms"] = statistics.median(ms)
            row["ms_min"], row["ms_max"] = min(ms), max(ms)
            row["images_per_s"] = batch / (row["ms"] / 1e3)
            row["train_gflop"] = flops * batch / 1e9
            row["tflops"] = row["train_gflop"] / row["ms"]
            row["peak_gib"] = peak_gib(device)
            return row
        except Exception as e:
            oom = "out of memory" in str(e).lower()
            model = opt = run = inputs = step = None  # let the retry have the memory
            if oom and batch > 1 and not args.batch:
                print(f"step: {row['config']}: out of memory at batch {batch}, halving", file=sys.stderr)
                batch //= 2
                continue
            row["batch"] = batch
            row["error"] = "failed: " + short_error(e)
            if args.verbose:
                traceback.print_exc()
            return row


def step_table(rows):
    lines = [f"{'config':<28} {'impl':<13} {'batch':>6} {'ms/step':>10} {'images/s':>10} {'TFLOP/s':>9} {'GiB':>8}"]
    for r in rows:
        head = f"{r['config']:<28} {r['impl']:<13} {r['batch']:>6}"
        if "error" in r:
            lines.append(f"{head} {r['error']}")
        else:
            lines.append(f"{head} {r['ms']:10.2f} {r['images_per_s']:10.1f} {r['tflops']:9.2f} {r['peak_gib']:8.2f}")
    return "\n".join(lines)


def mode_step(args, device):
    paths = [args.config] if args.config else sorted(glob.glob(os.path.join(args.root, "configs", "*.json")))
    rows = []
    for path in paths:
        m, t = load_config(find_config(path, args.root), args.set)
        row = bench_step_config(path, m, t, args, device)
        status = row.get("error") or f"{row['ms']:.2f} ms, {row['images_per_s']:.1f} images/s"
        print(f"step: {row['config']} batch {row['batch']}: {status}", file=sys.stderr)
        rows.append(row)
    print(step_table(rows))
    return rows


# ---------------------------------------------------------------------------
# Check mode: the modules above against the project's reference
# ---------------------------------------------------------------------------

def rel_err(a, b):
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at 1: a gradient that is 0 in exact
    arithmetic (a key bias under a single channel's softmax) is judged by
    its absolute error, not by a ratio of rounding noises."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1.0))


def mode_check(args, device):
    """Each implementation's output, auxiliary loss and gradients (input and
    weights) against tests/oracle/torch_oracle.py (the reference the C++ CPU
    backend is tested against), on small shapes: float64 on the CPU, float32
    on a GPU. Covers a channel subset, k = 1, 2, |S|, both combine rules,
    both balance losses and a z-loss."""
    sys.path.insert(0, os.path.join(args.root, "tests", "oracle"))
    import torch_oracle as oracle

    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    impls = [s for s in args.impl.split(",") if s]
    cases = [  # C, S, k, combine, aux, z-loss coefficient
        (4, [0, 1, 2, 3], 1, "softmax", "switch", 0.0),
        (4, [0, 2, 3], 2, "renorm", "importance", 1e-2),
        (5, [0, 1, 2, 3, 4], 5, "softmax", "switch", 1e-2),
        (3, [1], 1, "renorm", "none", 0.0),
    ]
    B, D, H = 2, 32, 2  # head dim 16: FlexAttention's kernels may refuse smaller ones
    failures = 0
    gen = torch.Generator().manual_seed(args.seed)
    for arch in ["chvit", "moevit"]:
        for ci, (C, S_list, k, combine, aux, zc) in enumerate(cases if arch == "moevit" else cases[:2]):
            m = dict(arch=arch, image=12, channels=C, patch=4, dim=D, depth=1, heads=H, num_classes=2,
                     top_k=k, combine=combine, aux=aux, aux_coef=0.5, z_loss_coef=zc, drop_path=0.0)
            cfg = oracle.ModelConfig(m)
            N, nS = cfg.num_patches, len(S_list)
            y = torch.randn(B, 1 + nS * N, D, generator=gen, dtype=torch.float64)
            dy = torch.randn(B, 1 + nS * N, D, generator=gen, dtype=torch.float64)
            for impl in (["sdpa"] if arch == "chvit" else impls):
                torch.manual_seed(args.seed + ci)
                if arch == "chvit":
                    mod = DenseAttention(D, H)
                else:
                    mod = MoEAttention(C, D, H, k, combine, aux, 0.5, zc, impl)
                with torch.no_grad():  # every weight random and O(1) in effect: routing decisive, biases tested
                    for prm in mod.parameters():
                        prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.3)
                # the oracle's parameter dictionary, from the same values (the names agree)
                ref_p = {"attn." + n: prm.detach().double().clone().requires_grad_()
                         for n, prm in mod.named_parameters()}
                y_ref = y.detach().clone().requires_grad_()
                S_cpu = torch.tensor(S_list)
                if arch == "chvit":
                    out_ref = oracle.dense_attention(ref_p, "attn.", y_ref, cfg)
                    aux_ref = torch.zeros((), dtype=torch.float64)
                else:
                    out_ref, a_ref, z_ref = oracle.moe_attention(ref_p, "attn.", y_ref, cfg, S_cpu)
                    aux_ref = a_ref + z_ref
                ((out_ref * dy).sum() + aux_ref).backward()

                mod = mod.to(device=device, dtype=dtype)
                y_dev = y.detach().to(device=device, dtype=dtype).clone().requires_grad_()
                try:
                    out, a = mod(y_dev, S_cpu.to(device), N)
                    a = a if a is not None else torch.zeros((), device=device, dtype=dtype)
                    ((out * dy.to(device=device, dtype=dtype)).sum() + a).backward()
                    errs = {"out": rel_err(out, out_ref), "aux": abs(float(a) - float(aux_ref)),
                            "dy": rel_err(y_dev.grad, y_ref.grad)}
                    for n, prm in mod.named_parameters():
                        errs["d" + n] = rel_err(prm.grad, ref_p["attn." + n].grad)
                    worst = max(errs, key=errs.get)
                    ok = errs[worst] <= tol
                    verdict = f"{'PASS' if ok else 'FAIL'} worst {worst} {errs[worst]:.2e}"
                except Exception as e:
                    ok = impl == "flex"  # flex may be missing: reported, not a failure of the model
                    verdict = ("SKIP " if ok else "FAIL ") + short_error(e)
                failures += not ok
                print(f"check {arch:<6} {impl:<6} C={C} S={S_list} k={k} {combine:<7} {aux:<10} z={zc}: {verdict}")

    # Whole models (step mode's Net, drop path 0): the parameter names and
    # shapes of DESIGN.md §2, logits, loss and every parameter's gradient.
    for arch in ["vit", "chvit", "moevit"]:
        for impl in (impls if arch == "moevit" else ["sdpa"]):
            m = dict(MODEL_DEFAULTS, arch=arch, image=8, channels=3, patch=4, dim=32, depth=2, heads=2,
                     num_classes=5, top_k=2, aux_coef=0.5, z_loss_coef=1e-2, drop_path=0.0)
            cfg = oracle.ModelConfig(m)
            torch.manual_seed(args.seed)
            net = Net(m, impl if arch == "moevit" else "padded")
            with torch.no_grad():
                for n, prm in net.named_parameters():
                    prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.2
                              + (1.0 if n.endswith(("norm1.weight", "norm2.weight")) or n == "norm.weight" else 0.0))
            shapes = {n: tuple(prm.shape) for n, prm in net.named_parameters()}
            if shapes != {n: tuple(v) for n, v in oracle.param_shapes(cfg).items()}:
                failures += 1
                print(f"check model  {arch:<6} {impl:<6}: FAIL parameter names or shapes differ from DESIGN.md §2")
                continue
            ref_p = {n: prm.detach().double().clone().requires_grad_() for n, prm in net.named_parameters()}
            images = torch.randn(3, m["channels"], 8, 8, generator=gen, dtype=torch.float64)
            labels = torch.randint(0, 5, (3,), generator=gen)
            S_list = list(range(m["channels"]))
            ref = oracle.forward(ref_p, cfg, images, labels, S_list)
            ref["loss"].backward()
            net = net.to(device=device, dtype=dtype).train()
            try:
                logits, a = net(images.to(device=device, dtype=dtype), torch.tensor(S_list, device=device))
                loss = F.cross_entropy(logits, labels.to(device)) + a
                loss.backward()
                errs = {"logits": rel_err(logits, ref["logits"]), "loss": abs(float(loss) - float(ref["loss"]))}
                for n, prm in net.named_parameters():
                    errs["d" + n] = rel_err(prm.grad, ref_p[n].grad)
                worst = max(errs, key=errs.get)
                ok = errs[worst] <= tol
                verdict = f"{'PASS' if ok else 'FAIL'} worst {worst} {errs[worst]:.2e}"
            except Exception as e:
                ok = impl == "flex"
                verdict = ("SKIP " if ok else "FAIL ") + short_error(e)
            failures += not ok
            print(f"check model  {arch:<6} {impl:<6} C=3 k=2 depth 2: {verdict}")
    print(f"check: {'all passed' if failures == 0 else f'{failures} failed'} (tolerance {tol:g}, {dtype})")
    return failures


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["attention", "step", "check"], default="attention",
                    help="check: the modules against tests/oracle/torch_oracle.py, small shapes")
    ap.add_argument("--config", help="one config (default: attention: the README's three shapes; step: configs/*.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, as prism's --set")
    ap.add_argument("--k", default="1,2,4,C", help="attention: moevit top-k values; C = channels")
    ap.add_argument("--impl", default="padded,naive,flex", help="attention: moevit implementations to time")
    ap.add_argument("--moe-impl", default="padded", choices=["padded", "naive", "flex"], help="step: moevit's implementation")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="bf16: autocast; fp32: no TF32, as prism")
    ap.add_argument("--compile", action="store_true", help="torch.compile the module (failures are reported)")
    ap.add_argument("--batch", type=int, default=0,
                    help="attention: default = prism's default; step: the config's train.batch, halved on OOM")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the Prism checkout (for configs/)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failed row")
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0 or args.batch < 0:
        raise SystemExit("--iters must be >= 1, --warmup and --batch >= 0")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("torch_peer: no CUDA device (use --device cpu for a smoke test)")
        ieee_fp32()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch_peer: torch {torch.__version__} on {name}", file=sys.stderr)

    if args.mode == "check":
        sys.exit(1 if mode_check(args, device) else 0)
    rows = mode_attention(args, device) if args.mode == "attention" else mode_step(args, device)
    for r in rows:
        r.update(device=name, torch=torch.__version__)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
