#!/usr/bin/env python3
"""Writes crates/normalizers/tests/fixtures/normalizers.json (bn, gn, ln, in) and
remedies.json (rms, frn, evonorm-s0, evonorm-b0, brn, ghostbn): reference values computed
independently of normbench in float64 numpy.

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



# ---------------------------------------------------------------------------------------------
# The remedies and batch-free layers (crates/normalizers/tests/fixtures/remedies.json).
#
# Each layer is a float64 numpy forward that also runs on complex inputs, and every gradient of
# loss = sum(y * r) is taken by the complex step, d/dp = Im(loss(p + i·h)) / h with h = 1e-30:
# exact to rounding, with no difference quotient and no autograd. Quantities the layers hold
# constant to the gradient (BRN's r and d, running statistics) are computed from real parts.
# ---------------------------------------------------------------------------------------------

REMEDY_SPECS = [
    ("rms", [2, 3, 4]),
    ("rms:eps=1e-3,affine=false", [4]),
    ("frn", [2, 3, 4, 5]),
    ("frn:tlu=false,eps=1e-4", [2, 4]),
    ("frn:affine=false", [4]),
    ("evonorm-s0:groups=3", [3, 4, 5]),
    ("evonorm-s0:groups=2,affine=false", [4]),
    ("evonorm-b0", [2, 3, 4]),
    ("evonorm-b0:momentum=0.3,affine=false", [4]),
    ("brn", [2, 4]),
    ("brn:rmax=1.5,dmax=0.5", [3, 4]),
    ("brn:rmax=2,dmax=1,warmup=3,momentum=0.2", [4]),
    ("brn:rmax=1,dmax=0", [4]),
    ("ghostbn:virtual=2", [3, 4, 5]),
    ("ghostbn:virtual=3,momentum=none", [4]),
    ("ghostbn:virtual=2,affine=false", [4]),
]
REMEDY_SHAPES = {2: (6, C), 3: (5, C, 4), 4: (5, C, 2, 3), 5: (3, C, 2, 2, 2)}
FRN_1X1 = (4, C, 1, 1)


def parse_remedy(spec):
    name, _, opts = spec.partition(":")
    cfg = {"name": name, "affine": True, "momentum": 0.1, "groups": 32, "tlu": True,
           "rmax": 3.0, "dmax": 5.0, "warmup": 0, "virtual": None,
           "eps": 1e-6 if name == "frn" else 1e-5}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=")
        if k in ("affine", "tlu"):
            cfg[k] = v == "true"
        elif k == "momentum":
            cfg[k] = None if v == "none" else float(v)
        elif k in ("groups", "warmup", "virtual"):
            cfg[k] = int(v)
        else:
            cfg[k] = float(v)
    return cfg


def remedy_params(cfg, rng):
    """The layer's learned variables: name -> values (C)."""
    p = {}
    if cfg["affine"]:
        p["weight"] = rng.uniform(0.5, 1.5, size=C)
        if cfg["name"] != "rms":
            p["bias"] = rng.normal(0, 0.5, size=C)
    if cfg["name"] == "frn" and cfg["tlu"]:
        p["tau"] = rng.normal(0, 0.3, size=C)
    if cfg["name"].startswith("evonorm"):
        p["v"] = rng.uniform(-1.0, 1.5, size=C)
    return p


def remedy_state(cfg, rng):
    """Initial running statistics, away from the defaults so that BRN's clips bite."""
    name = cfg["name"]
    if name in ("brn", "ghostbn"):
        st = {"running_mean": rng.normal(0, 2, size=C), "running_var": rng.uniform(0.1, 6, size=C)}
        if name == "brn" or cfg["momentum"] is None:
            st["num_batches_tracked"] = 0.0
        return st
    if name == "evonorm-b0":
        return {"running_var": rng.uniform(0.2, 4, size=C)}
    return {}


def moments_c(x, axes):
    mu = x.mean(axis=axes, keepdims=True)
    return mu, ((x - mu) * (x - mu)).mean(axis=axes, keepdims=True)


def pc(v):
    return v[None, :, None]


def fold(st, cfg, mean, var_unbiased):
    """One running-statistics update, PyTorch's way."""
    if cfg["momentum"] is None:
        st["num_batches_tracked"] += 1
        f = 1.0 / st["num_batches_tracked"]
    else:
        f = cfg["momentum"]
    for key, batch in (("running_mean", mean), ("running_var", var_unbiased)):
        if key in st:
            st[key] = (1 - f) * st[key] + f * batch


def bn_chunk(x, p, st, cfg, train, update):
    w, b = p.get("weight", np.ones(C)), p.get("bias", np.zeros(C))
    eps = cfg["eps"]
    if not train:
        xhat = (x - pc(st["running_mean"])) / np.sqrt(pc(st["running_var"]) + eps)
        return xhat * pc(w) + pc(b)
    mu, var = moments_c(x, (0, 2))
    m = x.shape[0] * x.shape[2]
    y = (x - mu) / np.sqrt(var + eps) * pc(w) + pc(b)
    if update:
        fold(st, cfg, mu.real.ravel(), var.real.ravel() * m / (m - 1))
    return y


def remedy_forward(x, p, st, cfg, train, update):
    """y for x (N, C, S), real or complex; updates `st` in place when `update`."""
    name, eps = cfg["name"], cfg["eps"]
    w, b = p.get("weight", np.ones(C)), p.get("bias", np.zeros(C))
    n, _, s = x.shape
    if name == "rms":
        ms = (x * x).mean(axis=(1, 2), keepdims=True)
        return x / np.sqrt(ms + eps) * pc(w)
    if name == "frn":
        nu2 = (x * x).mean(axis=2, keepdims=True)
        y = x / np.sqrt(nu2 + eps) * pc(w) + pc(b)
        if cfg["tlu"]:
            tau = np.broadcast_to(pc(p["tau"]), y.shape)
            y = np.where(y.real > tau.real, y, tau)
        return y
    if name == "evonorm-s0":
        g = cfg["groups"]
        _, var = moments_c(x.reshape(n, g, -1), (2,))
        num = (x * (1 / (1 + np.exp(-x * pc(p["v"]))))).reshape(n, g, -1)
        return (num / np.sqrt(var + eps)).reshape(n, C, s) * pc(w) + pc(b)
    if name == "evonorm-b0":
        if train:
            _, var_b = moments_c(x, (0, 2))
            m = n * s
            if update:
                fold(st, cfg, None, var_b.real.ravel() * m / (m - 1))
        else:
            var_b = pc(st["running_var"])
        _, var_i = moments_c(x, (2,))
        left = np.broadcast_to(np.sqrt(var_b + eps), x.shape)
        right = x * pc(p["v"]) + np.sqrt(var_i + eps)
        return x / np.where(right.real > left.real, right, left) * pc(w) + pc(b)
    if name == "brn":
        if not train:
            return bn_chunk(x, p, st, cfg, False, False)
        t = st["num_batches_tracked"]
        ramp = 1.0 if cfg["warmup"] == 0 else min(t / cfg["warmup"], 1.0)
        rmax, dmax = 1 + (cfg["rmax"] - 1) * ramp, cfg["dmax"] * ramp
        mu, var = moments_c(x, (0, 2))
        sigma_b = np.sqrt(var + eps)
        sigma = np.sqrt(pc(st["running_var"]) + eps)
        r = np.clip(sigma_b.real / sigma, 1 / rmax, rmax)
        d = np.clip((mu.real - pc(st["running_mean"])) / sigma, -dmax, dmax)
        y = ((x - mu) / sigma_b * r + d) * pc(w) + pc(b)
        if update:
            m = n * s
            fold(st, {"momentum": cfg["momentum"]}, mu.real.ravel(), var.real.ravel() * m / (m - 1))
            st["num_batches_tracked"] += 1
        return y
    if name == "ghostbn":
        if not train:
            return bn_chunk(x, p, st, cfg, False, False)
        k = cfg["virtual"]
        return np.concatenate([bn_chunk(x[i:i + k], p, st, cfg, True, update)
                               for i in range(0, n, k)], axis=0)
    raise ValueError(name)


def complex_grads(x, r, p, st, cfg, train):
    """Gradients of sum(y * r) for x and every variable, by the complex step."""
    h = 1e-30

    def loss(xc, pc_):
        return (remedy_forward(xc, pc_, {k: np.copy(v) for k, v in st.items()}, cfg, train,
                               False) * r).sum()

    grads = {"x": np.zeros(x.size)}
    xf = x.ravel()
    for j in range(x.size):
        xc = xf.astype(complex)
        xc[j] += 1j * h
        grads["x"][j] = loss(xc.reshape(x.shape), p).imag / h
    for name, values in p.items():
        g = np.zeros(C)
        for j in range(C):
            pc_ = dict(p)
            v = values.astype(complex)
            v[j] += 1j * h
            pc_[name] = v
            g[j] = loss(x.astype(complex), pc_).imag / h
        grads[name] = g
    return {k: v.tolist() for k, v in grads.items()}


def make_remedy_case(spec, shape, rng):
    cfg = parse_remedy(spec)
    n = shape[0]
    s = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    bshape = (1, C) + (1,) * (len(shape) - 2)
    offsets, scales = rng.normal(0, 1.5, size=C), rng.uniform(0.5, 2.0, size=C)
    xs = [rng.normal(size=shape) * scales.reshape(bshape) + offsets.reshape(bshape)
          for _ in range(2)]
    r = rng.normal(size=shape)
    p = remedy_params(cfg, rng)
    st = remedy_state(cfg, rng)
    case = {"spec": spec, "shape": list(shape), "xs": [x.ravel().tolist() for x in xs],
            "r": r.ravel().tolist(), "params": {k: v.tolist() for k, v in p.items()},
            "init": {k: np.ravel(v).tolist() for k, v in st.items()}, "steps": []}
    r3 = r.reshape(n, C, s)
    for x in xs:
        x3 = x.reshape(n, C, s)
        grads = complex_grads(x3, r3, p, st, cfg, True)
        y = remedy_forward(x3, p, st, cfg, True, True)
        case["steps"].append({"y": y.ravel().tolist(), "grads": grads})
    case["after"] = {k: np.ravel(v).tolist() for k, v in st.items()}
    x3 = xs[0].reshape(n, C, s)
    case["eval"] = {"y": remedy_forward(x3, p, st, cfg, False, False).ravel().tolist(),
                    "grads": complex_grads(x3, r3, p, st, cfg, False)}
    return case


def main_remedies():
    rng = np.random.default_rng(20201)
    cases = [make_remedy_case(spec, REMEDY_SHAPES[rank], rng)
             for spec, ranks in REMEDY_SPECS for rank in ranks]
    cases += [make_remedy_case(spec, FRN_1X1, rng) for spec in ("frn", "frn:eps=1e-3")]
    out = os.path.join(os.path.dirname(__file__), "..", "crates", "normalizers", "tests",
                       "fixtures", "remedies.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/make_fixtures.py", "cases": cases}, f,
                  separators=(",", ":"))
    print(f"wrote {len(cases)} cases to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
    main_remedies()
