#!/usr/bin/env python3
"""Checks that the oracle itself computes what DESIGN.md section 1 says.

Usage:  /usr/bin/python3 tests/oracle/selfcheck.py

1. A second, naive implementation (Python loops over images, tokens, heads and
   routed channels; hand-written LayerNorm, GELU, softmax, top-k by sorting)
   must agree with torch_oracle.py on logits, every loss term and every
   gradient, for all three archs over a matrix of subsets / top_k / combine /
   aux / z-loss settings.
2. Central finite differences of the total loss must agree with the oracle's
   autograd gradients (the routing is piecewise constant, so away from ties
   the derivative of the loss is exactly what autograd returns).
3. Top-k ties go to the lower channel index; vit with C=1 equals chvit with
   C=1 and a zero channel embedding; safetensors round-trips every dtype.
Exit 0 when everything holds.
"""

import itertools
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_oracle as oracle  # noqa: E402

torch.set_default_dtype(torch.float64)
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print("  FAILED:", what)


# --------------------------------------------------------------------------
# Naive reference: one vector at a time.
# --------------------------------------------------------------------------

def n_layernorm(x, w, b):
    mu = x.sum() / x.numel()
    var = ((x - mu) ** 2).sum() / x.numel()
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def n_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def n_linear(x, W, b):
    return W @ x + b


def n_softmax(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def n_mha(q, keys, values, heads):
    """q [D]; keys/values lists of [D]. Per head softmax(q·k/sqrt(dh)) v."""
    D = q.numel()
    dh = D // heads
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = torch.stack([q[sl] @ k[sl] for k in keys]) / math.sqrt(dh)
        w = n_softmax(scores)
        outs.append(sum(w[j] * values[j][sl] for j in range(len(values))))
    return torch.cat(outs)


def n_embed(p, cfg, img, S):
    """Token list for one image [C,H,W]."""
    P, (gh, gw) = cfg.patch, cfg.grid
    C = cfg.channels
    cls = p["cls_token"][0, 0] + p["pos_embed"][0, 0]
    toks = [cls]
    Wpe = p["patch_embed.weight"].reshape(cfg.dim, -1)
    if cfg.arch == "vit":
        x = torch.stack([img[c] * (C / len(S)) if c in S else torch.zeros_like(img[c])
                         for c in range(C)])
        for gy in range(gh):
            for gx in range(gw):
                patch = x[:, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P].reshape(-1)
                toks.append(Wpe @ patch + p["patch_embed.bias"] + p["pos_embed"][0, 1 + gy * gw + gx])
        return toks
    for c in S:
        for gy in range(gh):
            for gx in range(gw):
                patch = img[c, gy * P:(gy + 1) * P, gx * P:(gx + 1) * P].reshape(-1)
                toks.append(Wpe @ patch + p["patch_embed.bias"]
                            + p["pos_embed"][0, 1 + gy * gw + gx] + p["channel_embed"][c])
    return toks


def n_forward(p, cfg, images, labels, S):
    B = images.shape[0]
    N, Hd, D = cfg.num_patches, cfg.heads, cfg.dim
    seqs = [n_embed(p, cfg, images[b], S) for b in range(B)]
    aux_blocks, z_blocks = [], []
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        ys = [[n_layernorm(t, p[pre + "norm1.weight"], p[pre + "norm1.bias"]) for t in seq]
              for seq in seqs]
        attn_out = []
        if cfg.arch != "moevit":
            Wqkv, bqkv = p[pre + "attn.qkv.weight"], p[pre + "attn.qkv.bias"]
            for y in ys:
                qkv = [n_linear(t, Wqkv, bqkv) for t in y]
                qs = [v[:D] for v in qkv]
                ks = [v[D:2 * D] for v in qkv]
                vs = [v[2 * D:] for v in qkv]
                attn_out.append([n_mha(q, ks, vs, Hd) for q in qs])
        else:
            k_eff = min(cfg.top_k, len(S))
            counts = {c: 0 for c in S}
            prob_sum = {c: 0.0 for c in S}
            lse_sq = []
            n_tok = 0
            for y in ys:
                # keys/values of channel c come from that channel's N patches.
                keys, vals = {}, {}
                for j, c in enumerate(S):
                    rows = y[1 + j * N:1 + (j + 1) * N]
                    keys[c] = [n_linear(t, p[pre + "attn.k.weight"][c], p[pre + "attn.k.bias"][c]) for t in rows]
                    vals[c] = [n_linear(t, p[pre + "attn.v.weight"][c], p[pre + "attn.v.bias"][c]) for t in rows]
                qs = [n_linear(t, p[pre + "attn.q.weight"], p[pre + "attn.q.bias"]) for t in y]
                out = [n_mha(qs[0], sum((keys[c] for c in S), []), sum((vals[c] for c in S), []), Hd)]
                for t in range(1, len(y)):
                    z = n_linear(y[t], p[pre + "attn.router.weight"], p[pre + "attn.router.bias"])
                    zS = torch.stack([z[c] for c in S])
                    pS = n_softmax(zS)
                    prob = {c: pS[j] for j, c in enumerate(S)}
                    chosen = sorted(S, key=lambda c: (-prob[c].item(), c))[:k_eff]
                    if cfg.combine == "softmax":
                        weight = {c: prob[c] for c in chosen}
                    else:
                        tot = sum(prob[c] for c in chosen)
                        weight = {c: prob[c] / tot for c in chosen}
                    out.append(sum(weight[c] * n_mha(qs[t], keys[c], vals[c], Hd) for c in chosen))
                    for c in chosen:
                        counts[c] += 1
                    for c in S:
                        prob_sum[c] = prob_sum[c] + prob[c]
                    lse_sq.append(torch.log(torch.exp(zS).sum()) ** 2)
                    n_tok += 1
                attn_out.append(out)
            if cfg.aux == "switch":
                aux = cfg.aux_coef * len(S) * sum(
                    (counts[c] / (n_tok * k_eff)) * (prob_sum[c] / n_tok) for c in S)
            elif cfg.aux == "importance":
                imp = torch.stack([prob_sum[c] for c in S])
                mean = imp.sum() / len(S)
                aux = cfg.aux_coef * (((imp - mean) ** 2).sum() / len(S)) / mean ** 2
            else:
                aux = torch.zeros(())
            aux_blocks.append(aux)
            z_blocks.append(cfg.z_loss_coef * sum(lse_sq) / n_tok)
        new = []
        for seq, a in zip(seqs, attn_out):
            row = []
            for t, at in zip(seq, a):
                x = t + n_linear(at, p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"])
                h = n_layernorm(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"])
                h = n_gelu(n_linear(h, p[pre + "mlp.fc1.weight"], p[pre + "mlp.fc1.bias"]))
                row.append(x + n_linear(h, p[pre + "mlp.fc2.weight"], p[pre + "mlp.fc2.bias"]))
            new.append(row)
        seqs = new
    logits = torch.stack([
        n_linear(n_layernorm(seq[0], p["norm.weight"], p["norm.bias"]), p["head.weight"], p["head.bias"])
        for seq in seqs])
    ce = sum(-torch.log(n_softmax(logits[b])[labels[b]]) for b in range(B)) / B
    aux = sum(aux_blocks) / len(aux_blocks) if aux_blocks else torch.zeros(())
    zl = sum(z_blocks) / len(z_blocks) if z_blocks else torch.zeros(())
    return {"logits": logits, "loss": ce + aux + zl, "ce_loss": ce, "aux_loss": aux, "z_loss": zl}


def naive_compute(weights, cfg, images, labels, S):
    params = {n: weights[n].clone().requires_grad_(True) for n in oracle.param_shapes(cfg)}
    out = n_forward(params, cfg, images, labels, S)
    out["loss"].backward()
    res = {"logits": out["logits"].detach()}
    for n in ("loss", "ce_loss", "aux_loss", "z_loss"):
        res[n] = torch.as_tensor(out[n]).detach().reshape(1)
    for n, t in params.items():
        res["grad." + n] = t.grad if t.grad is not None else torch.zeros_like(t)
    return res


# --------------------------------------------------------------------------

def make(arch, C=3, S=None, k=2, combine="softmax", aux="switch", z=0.0, seed=0,
         image=4, patch=2, dim=8, heads=2, depth=2, B=2, classes=3):
    model = dict(arch=arch, image=image, channels=C, patch=patch, dim=dim, depth=depth,
                 heads=heads, mlp_ratio=4.0, num_classes=classes, top_k=k, combine=combine,
                 aux=aux, aux_coef=0.05, z_loss_coef=z, drop_path=0.0)
    cfg = oracle.ModelConfig(model)
    g = torch.Generator().manual_seed(seed)
    w = {}
    for n, shape in oracle.param_shapes(cfg).items():
        # larger std than make_case so routing and attention are far from uniform
        w[n] = torch.randn(shape, generator=g) * 0.3
        if n.endswith("norm1.weight") or n.endswith("norm2.weight") or n == "norm.weight":
            w[n] = w[n] + 1.0
    images = torch.randn((B, C, image, image), generator=g)
    labels = torch.randint(0, classes, (B,), generator=g)
    S = list(range(C)) if S is None else S
    return cfg, w, images, labels, S


def compare(a, b):
    """Worst rel error by the oracle's own rule (zero-floor 1e-8 for gradients)."""
    _, worst, failed = oracle.judge(a, b, tol=1e-7, zero_floor=1e-8)
    return float("inf") if failed else worst


def finite_difference(cfg, w, images, labels, S, gen, per_param=2, h=1e-5):
    """Max |fd - autograd| / max(1, |autograd|) over a few entries of every param."""
    grads = oracle.compute(w, cfg, images, labels, torch.tensor(S))

    def loss_at(weights):
        with torch.no_grad():
            return oracle.forward(weights, cfg, images, labels, S)["loss"].item()

    worst = 0.0
    for n in oracle.param_shapes(cfg):
        g = grads["grad." + n].reshape(-1)
        for _ in range(per_param):
            i = int(torch.randint(0, g.numel(), (1,), generator=gen))
            wp = dict(w)
            wm = dict(w)
            wp[n] = w[n].clone()
            wp[n].view(-1)[i] += h
            wm[n] = w[n].clone()
            wm[n].view(-1)[i] -= h
            fd = (loss_at(wp) - loss_at(wm)) / (2 * h)
            worst = max(worst, abs(fd - g[i].item()) / max(1.0, abs(g[i].item())))
    return worst


def main():
    cases = []
    for arch in ("vit", "chvit"):
        for S in (None, [0, 2], [1]):
            cases.append(dict(arch=arch, S=S))
    for S, k, combine, aux, z in itertools.product(
            (None, [0, 2], [1]), (1, 2, 3), ("softmax", "renorm"),
            ("switch", "importance", "none"), (0.0, 0.02)):
        if S is not None and k > len(S) and k != 3:
            continue  # k > |S| is covered by k = C = 3
        cases.append(dict(arch="moevit", S=S, k=k, combine=combine, aux=aux, z=z))

    print(f"1+2. naive loop model and finite differences vs oracle ({len(cases)} cases)")
    gen = torch.Generator().manual_seed(1)
    worst_naive = worst_fd = 0.0
    for i, kw in enumerate(cases):
        cfg, w, images, labels, S = make(seed=i, **kw)
        ours = oracle.compute(w, cfg, images, labels, torch.tensor(S))
        ref = naive_compute(w, cfg, images, labels, S)
        e_naive = compare(ours, ref)
        # finite differences on a subset of cases (each costs many forwards)
        e_fd = finite_difference(cfg, w, images, labels, S, gen) if i % 4 == 0 else float("nan")
        worst_naive = max(worst_naive, e_naive)
        if not math.isnan(e_fd):
            worst_fd = max(worst_fd, e_fd)
        print(f"  {kw}: naive rel {e_naive:.1e}, fd {e_fd:.1e}, "
              f"loss {ours['loss'].item():.6f} aux {ours['aux_loss'].item():.3e} "
              f"z {ours['z_loss'].item():.3e}")
        check(e_naive < 1e-7, f"naive vs oracle {kw}: {e_naive:.1e}")
        check(math.isnan(e_fd) or e_fd < 1e-7, f"finite difference {kw}: {e_fd:.1e}")
        if cfg.arch == "moevit" and len(S) > 1 and not (kw["combine"] == "renorm" and kw["k"] == 1):
            # the combine weights carry gradient into the first block's router
            # (the last block's patch outputs do not reach the CLS head)
            check(ours["grad.blocks.0.attn.router.weight"].norm() > 1e-6,
                  f"router gets gradient {kw}")
    print(f"  worst naive rel {worst_naive:.1e}, worst finite-difference err {worst_fd:.1e}")

    print("3a. ties go to the lower channel index")
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3], [0.0, 0.5, 0.0, 0.5]])
    in_s = torch.tensor([True, True, True, True])
    got = oracle.topk_mask(probs, 2, in_s)
    want = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    check(torch.equal(got, want), f"topk ties: {got.int().tolist()}")
    in_s = torch.tensor([False, True, False, True])
    got = oracle.topk_mask(torch.tensor([[0.0, 0.5, 0.0, 0.5]]), 2, in_s)
    check(torch.equal(got, torch.tensor([[False, True, False, True]])), "topk outside S")
    for combine in ("softmax", "renorm"):
        cfg, w, images, labels, S = make("moevit", C=4, S=[0, 1, 3], k=2, combine=combine, seed=7)
        for i in range(cfg.depth):  # zero router => all probabilities tie exactly
            w[f"blocks.{i}.attn.router.weight"].zero_()
            w[f"blocks.{i}.attn.router.bias"].zero_()
        e = compare(oracle.compute(w, cfg, images, labels, torch.tensor(S)),
                    naive_compute(w, cfg, images, labels, S))
        print(f"  zero router, {combine}: naive rel {e:.1e}")
        check(e < 1e-7, f"zero-router tie case {combine}: {e:.1e}")

    print("3b. vit with C=1 equals chvit with C=1 and zero channel_embed")
    cfg_c, w_c, images, labels, S = make("chvit", C=1, seed=3)
    w_c["channel_embed"].zero_()
    cfg_v, _, _, _, _ = make("vit", C=1, seed=3)
    w_v = {n: w_c[n] for n in oracle.param_shapes(cfg_v)}
    a = oracle.compute(w_v, cfg_v, images, labels, torch.tensor(S))
    b = oracle.compute(w_c, cfg_c, images, labels, torch.tensor(S))
    e = max(oracle.rel_error(a["logits"], b["logits"]),
            oracle.rel_error(a["grad.blocks.0.attn.qkv.weight"], b["grad.blocks.0.attn.qkv.weight"]))
    print(f"  rel {e:.1e}")
    check(e < 1e-12, f"vit/chvit C=1: {e:.1e}")

    print("3c. safetensors round trip")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        ts = {"a": torch.randn(2, 3), "b": torch.randn(5).float(), "c": torch.arange(7),
              "d": torch.arange(3, dtype=torch.int32), "e": torch.tensor([1.5])}
        oracle.write_safetensors(path, ts, {"config": '{"x": 1}'})
        back, meta = oracle.read_safetensors(path)
        ok = meta == {"config": '{"x": 1}'} and set(back) == set(ts) and all(
            back[n].dtype == ts[n].dtype and torch.equal(back[n], ts[n]) for n in ts)
        check(ok, "safetensors round trip")
        with open(path, "rb") as f:
            hlen = int.from_bytes(f.read(8), "little")
        check(hlen % 8 == 0, "header padded to 8 bytes")

    print("selfcheck:", "PASS" if not FAILURES else f"FAIL ({len(FAILURES)})")
    return 0 if not FAILURES else 1


if __name__ == "__main__":
    sys.exit(main())
