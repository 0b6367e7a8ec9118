#!/usr/bin/env python3
"""Writes crates/normalizers/tests/fixtures/normalizers.json: reference values for every
normalizer, computed independently of normbench in float64 numpy.

Conventions (PyTorch's, and the GroupNorm paper's): normalize with the biased variance; running
statistics are updated as (1 - f) * running + f * batch with the *unbiased* batch variance, f the
momentum or 1/k at the k-th batch for a cumulative average; InstanceNorm's running statistics are
the batch averages of the per-instance mean and unbiased variance. The affine transform is per
channel. Gradients are of loss = sum(y * r) and are derived by hand, not by autograd.

Usage: python3 scripts/make_fixtures.py   (needs numpy; the output is committed)
"""
import json
import os

import numpy as np

C = 6
SHAPES = {2: (5, C), 3: (3, C, 5), 4: (2, C, 3, 5), 5: (2, C, 2, 3, 3)}
SPECS = [
    "bn",
    "bn:momentum=none",
    "bn:momentum=0.3,eps=1e-3",
    "bn:track_running_stats=false",
    "bn:affine=false",
    "gn:groups=3",
    "gn:groups=2,eps=1e-3",
    "gn:groups=1,affine=false",
    "ln",
    "in",
    "in:track_running_stats=true",
    "in:track_running_stats=true,momentum=0.3",
]
STEPS = 3


def parse(spec):
    name, _, opts = spec.partition(":")
    cfg = {"name": name, "eps": 1e-5, "affine": True, "momentum": 0.1, "groups": 32,
           "track": name == "bn"}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=")
        if k == "track_running_stats":
            cfg["track"] = v == "true"
        elif k == "affine":
            cfg["affine"] = v == "true"
        elif k == "momentum":
            cfg["momentum"] = None if v == "none" else float(v)
        elif k == "groups":
            cfg["groups"] = int(v)
        else:
            cfg[k] = float(v)
    return cfg


def rows(x3, cfg):
    """The normalization sets of x3 (N, C, S) as rows, and the inverse map."""
    n, c, s = x3.shape
    if cfg["name"] == "bn":
        to = lambda a: a.transpose(1, 0, 2).reshape(c, n * s)
        back = lambda r: r.reshape(c, n, s).transpose(1, 0, 2)
    else:
        g = {"gn": cfg["groups"], "ln": 1, "in": c}[cfg["name"]]
        to = lambda a: a.reshape(n * g, (c // g) * s)
        back = lambda r: r.reshape(n, c, s)
    return to, back


def forward_backward(x3, r3, w, b, cfg, running=None):
    """Output, and gradients of sum(y * r) for x, weight, bias. `running` = (mean, var) per
    channel to normalize with instead of the batch statistics."""
    eps = cfg["eps"]
    if running is not None:
        mean, var = running
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = (x3 - mean[None, :, None]) * rstd[None, :, None]
        dxhat = r3 * w[None, :, None]
        dx = dxhat * rstd[None, :, None]
        stats = None
    else:
        to, back = rows(x3, cfg)
        xr = to(x3)
        mu = xr.mean(axis=1, keepdims=True)
        var = ((xr - mu) ** 2).mean(axis=1, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat_r = (xr - mu) * rstd
        xhat = back(xhat_r)
        dxhat_r = to(r3 * w[None, :, None])
        dx_r = rstd * (dxhat_r - dxhat_r.mean(axis=1, keepdims=True)
                       - xhat_r * (dxhat_r * xhat_r).mean(axis=1, keepdims=True))
        dx = back(dx_r)
        stats = (mu[:, 0], var[:, 0], xr.shape[1])
    y = xhat * w[None, :, None] + b[None, :, None]
    dw = (r3 * xhat).sum(axis=(0, 2))
    db = r3.sum(axis=(0, 2))
    return y, dx, dw, db, stats


def batch_running_update(stats, cfg, n):
    """Per-channel (mean, unbiased var) that one training batch contributes."""
    mu, var, m = stats
    unbiased = var * m / (m - 1)
    if cfg["name"] == "bn":
        return mu, unbiased
    return mu.reshape(n, C).mean(axis=0), unbiased.reshape(n, C).mean(axis=0)


def make_case(spec, shape, rng, large_mean=False):
    """With `large_mean`, the inputs are f32 values around 1000 with a spread of 0.01 (rounded to
    f32 first; the reference is the float64 computation on the rounded values)."""
    cfg = parse(spec)
    rank = len(shape)
    n = shape[0]
    s = int(np.prod(shape[2:])) if rank > 2 else 1
    if large_mean:
        offsets, scales = np.full(C, 1000.0), np.full(C, 0.01)
    else:
        offsets, scales = rng.normal(0, 3, size=C), rng.uniform(0.5, 2.0, size=C)
    bshape = (1, C) + (1,) * (rank - 2)
    xs = [rng.normal(size=shape) * scales.reshape(bshape) + offsets.reshape(bshape)
          for _ in range(STEPS)]
    if large_mean:
        xs = [x.astype(np.float32).astype(np.float64) for x in xs]
    r = rng.normal(size=shape)
    if cfg["affine"]:
        w, b = rng.uniform(0.5, 1.5, size=C), rng.normal(0, 0.5, size=C)
    else:
        w, b = np.ones(C), np.zeros(C)
    track = cfg["track"]
    rm, rv = np.zeros(C), np.ones(C)
    case = {"spec": spec, "shape": list(shape), "xs": [x.ravel().tolist() for x in xs],
            "r": r.ravel().tolist()}
    if cfg["affine"]:
        case["weight"], case["bias"] = w.tolist(), b.tolist()
    r3 = r.reshape(n, C, s)
    for k, x in enumerate(xs, start=1):
        y, dx, dw, db, stats = forward_backward(x.reshape(n, C, s), r3, w, b, cfg)
        if k == 1:
            case["train"] = {"y": y.ravel().tolist(), "dx": dx.ravel().tolist(),
                             "dweight": dw.tolist(), "dbias": db.tolist()}
        if track:
            bm, bv = batch_running_update(stats, cfg, n)
            f = 1.0 / k if cfg["momentum"] is None else cfg["momentum"]
            rm, rv = (1 - f) * rm + f * bm, (1 - f) * rv + f * bv
    if track:
        case["running_mean"], case["running_var"] = rm.tolist(), rv.tolist()
    y, dx, dw, db, _ = forward_backward(xs[0].reshape(n, C, s), r3, w, b, cfg,
                                        running=(rm, rv) if track else None)
    case["eval"] = {"y": y.ravel().tolist(), "dx": dx.ravel().tolist(),
                    "dweight": dw.tolist(), "dbias": db.tolist()}
    return case


def main():
    rng = np.random.default_rng(20181)
    cases = [make_case(spec, shape, rng)
             for spec in SPECS for rank, shape in SHAPES.items()
             if not (spec.startswith("in") and rank == 2)]
    large = [make_case(spec, (4, C, 4, 4), rng, large_mean=True)
             for spec in ["bn", "bn:momentum=none", "gn:groups=3", "ln", "in",
                          "in:track_running_stats=true"]]
    out = os.path.join(os.path.dirname(__file__), "..", "crates", "normalizers", "tests",
                       "fixtures", "normalizers.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/make_fixtures.py", "cases": cases,
                   "large_mean_f32": large}, f, separators=(",", ":"))
    print(f"wrote {len(cases)} cases and {len(large)} large-mean cases to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
