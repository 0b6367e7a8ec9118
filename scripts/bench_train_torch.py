#!/usr/bin/env python3
"""The sweep's model trained by PyTorch on CPU, timed as `bench-train` times normbench's step.

Optional: `experiments bench-train --pytorch PYTHON` runs this script in the same run and puts
its numbers beside normbench's. Needs torch (`pip install torch`); nothing in the tests does.

The model is `resnet:width=W,blocks=K,stages=N,groups=G` as `experiments/src/model.rs` builds
it: a 3x3 stem convolution + normalizer + ReLU, N stages (3 by default) of K basic blocks
(widths W, 2W, 4W, ..., the first block of every stage after the first with stride 2 and a 1x1
convolution + normalizer shortcut), global average pooling and a linear classifier;
convolutions without bias. The step is forward, cross-entropy, backward and SGD (momentum 0.9,
weight decay 5e-4, in place), on one random batch, f32, NCHW. The normalizers: `bn` BatchNorm2d (training), `gn:groups=G` GroupNorm(G, C),
`ln` GroupNorm(1, C) (normbench's LayerNorm over (C, H, W) with a per-channel affine), `in`
InstanceNorm2d(C, affine=True).

Prints one JSON object: {"torch": version, "threads": T, "rows": [{"norm", "batch",
"ms_per_image"}, ...]}, each the median step time per image over at least 3 steps and
--min-time seconds, after two warm-up steps.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn


def make_norm(spec, c):
    name, _, rest = spec.partition(":")
    keys = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in rest.split(",") if kv)
    groups = keys.get("groups", "32")
    if name == "bn" and not keys:
        return nn.BatchNorm2d(c)
    if name == "gn" and set(keys) <= {"groups"} and groups.isdigit() and int(groups) > 0:
        return nn.GroupNorm(int(groups), c)
    if name == "ln" and not keys:
        return nn.GroupNorm(1, c)
    if name == "in" and not keys:
        return nn.InstanceNorm2d(c, affine=True)
    sys.exit(f"bench_train_torch.py: no PyTorch twin for normalizer {spec!r}; use bn, gn:groups=G, ln or in")


class ConvNorm(nn.Sequential):
    def __init__(self, cin, cout, k, stride, norm):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), make_norm(norm, cout)
        )


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.first = ConvNorm(cin, cout, 3, stride, norm)
        self.second = ConvNorm(cout, cout, 3, 1, norm)
        self.shortcut = (
            ConvNorm(cin, cout, 1, stride, norm) if stride != 1 or cin != cout else None
        )

    def forward(self, x):
        y = self.second(torch.relu(self.first(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(y + skip)


class ResNet(nn.Module):
    def __init__(self, width, blocks, stages, norm, classes=10):
        super().__init__()
        self.stem = ConvNorm(3, width, 3, 1, norm)
        layers, cin = [], width
        for stage in range(stages):
            cout = width << stage
            for b in range(blocks):
                layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1, norm))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        y = self.blocks(torch.relu(self.stem(x)))
        return self.fc(y.mean((2, 3)))


def step_ms_per_image(norm, batch, args):
    torch.manual_seed(0)
    model = ResNet(args.width, args.blocks, args.stages, norm).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    sgd = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": rest, "weight_decay": 0.0}],
        lr=0.01,
        momentum=0.9,
    )
    x = torch.randn(batch, 3, args.size, args.size)
    y = torch.arange(batch) % 10

    def step():
        sgd.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()

    step()
    step()
    samples, start = [], time.perf_counter()
    while len(samples) < 3 or time.perf_counter() - start < args.min_time:
        t = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3 / batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norms", default="bn,gn:groups=8,ln,in")
    p.add_argument("--batch-sizes", default="32,16,8,4,2")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-time", type=float, default=0.3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for norm in args.norms.split(","):
        for b in (int(v) for v in args.batch_sizes.split(",")):
            rows.append(
                {"norm": norm, "batch": b, "ms_per_image": step_ms_per_image(norm, b, args)}
            )
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
