#!/usr/bin/env python3
"""Write a random oracle case directory (self-test helper for torch_oracle.py).

Usage:  /usr/bin/python3 tests/oracle/make_case.py DIR --arch moevit \
            --subset 0,2,3 --top-k 2 --combine renorm --aux importance \
            --z-loss-coef 1e-3 [--corrupt [NAME]]

DIR gets weights.safetensors, batch.safetensors and expected.safetensors in
exactly the format the C++ side writes, with expected values from this
oracle's own model. Running torch_oracle.py on it must PASS; with --corrupt
one expected tensor (default grad.blocks.0.attn.proj.weight) is perturbed by
1e-3 of its norm, and the oracle must FAIL.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_oracle as oracle  # noqa: E402


def random_weights(cfg, gen, std):
    """N(0, std) for every parameter; LayerNorm scales 1 + N(0, std) so the
    activations keep a sensible size through the blocks."""
    weights = {}
    for name, shape in oracle.param_shapes(cfg).items():
        w = torch.randn(shape, generator=gen) * std
        if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
            w = w + 1.0
        weights[name] = w
    return weights


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--arch", choices=["vit", "chvit", "moevit"], default="moevit")
    ap.add_argument("--image", type=int, default=8)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--subset", default="all",
                    help="comma-separated channel list, or 'all'")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--combine", choices=["softmax", "renorm"], default="softmax")
    ap.add_argument("--aux", choices=["switch", "importance", "none"], default="switch")
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--z-loss-coef", type=float, default=0.0)
    ap.add_argument("--std", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corrupt", nargs="?", const="grad.blocks.0.attn.proj.weight",
                    help="perturb this expected tensor (default "
                         "grad.blocks.0.attn.proj.weight) so the oracle must FAIL")
    args = ap.parse_args(argv)

    model = {
        "arch": args.arch, "image": args.image, "channels": args.channels,
        "patch": args.patch, "dim": args.dim, "depth": args.depth,
        "heads": args.heads, "mlp_ratio": args.mlp_ratio,
        "num_classes": args.classes, "top_k": args.top_k,
        "combine": args.combine, "aux": args.aux, "aux_coef": args.aux_coef,
        "z_loss_coef": args.z_loss_coef, "drop_path": 0.0,
    }
    config = {"model": model,
              "data": {"train": "", "val": "", "augment": False},
              "train": {"batch": args.batch, "seed": args.seed, "hcs": args.subset != "all"}}
    cfg = oracle.ModelConfig(model)

    if args.subset == "all":
        S = list(range(cfg.channels))
    else:
        S = sorted({int(c) for c in args.subset.split(",")})
    gen = torch.Generator().manual_seed(args.seed)
    weights = random_weights(cfg, gen, args.std)
    images = torch.randn((args.batch, cfg.channels, cfg.height, cfg.width), generator=gen)
    labels = torch.randint(0, cfg.num_classes, (args.batch,), generator=gen)
    channels = torch.tensor(S, dtype=torch.int64)

    expected = oracle.compute(weights, cfg, images, labels, channels)
    if args.corrupt:
        if args.corrupt not in expected:
            sys.exit(f"make_case: --corrupt {args.corrupt}: no such expected tensor")
        t = expected[args.corrupt].clone()
        norm = t.norm().item()
        t.view(-1)[0] += 1e-3 * (norm if norm > 0 else 1.0)
        expected[args.corrupt] = t

    os.makedirs(args.dir, exist_ok=True)
    oracle.write_safetensors(os.path.join(args.dir, "weights.safetensors"), weights,
                             {"config": json.dumps(config)})
    oracle.write_safetensors(os.path.join(args.dir, "batch.safetensors"),
                             {"images": images, "labels": labels, "channels": channels})
    oracle.write_safetensors(os.path.join(args.dir, "expected.safetensors"), expected)
    print(f"make_case: wrote {args.dir} ({args.arch}, S={S}, loss "
          f"{expected['loss'].item():.6f}{', corrupted ' + args.corrupt if args.corrupt else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
