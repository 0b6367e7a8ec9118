//! Gradients from candle's autograd against central finite differences, in f64, for every
//! normalizer in training and evaluation.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{both_impls, build, randomize_affine, seeded, to_f64, var, weighted_sum};

const H: f64 = 1e-6;

/// Checks d(sum(y · r))/dθ for the input, weight and bias of `spec` on `shape`, with the fused
/// kernels and with the reference ops.
fn gradcheck(spec: &str, shape: &[usize], train: bool) {
    for spec in both_impls(spec) {
        gradcheck_impl(&spec, shape, train);
    }
}

fn gradcheck_impl(spec: &str, shape: &[usize], train: bool) {
    let c = shape[1];
    let (norm, varmap) = build(spec, c, DType::F64);
    randomize_affine(&varmap, c, 7);
    let x = Var::from_tensor(&seeded(shape, 1, 2.0, 1.5)).unwrap();
    let r = seeded(shape, 2, 0.0, 1.0);
    if !train {
        // Give tracked running statistics values other than their initial 0 and 1.
        norm.forward_t(&seeded(shape, 3, 1.0, 2.0), true).unwrap();
    }
    // brn's training output depends on the running statistics it updates: its gradient is
    // checked on the same computation without the update.
    let forward = |x: &Tensor| {
        if train && spec.starts_with("brn") {
            norm.forward_batch_stats(x)
        } else {
            norm.forward_t(x, train)
        }
    };
    let loss = || -> f64 {
        let y = forward(x.as_tensor()).unwrap();
        weighted_sum(&y, &r).unwrap().to_scalar::<f64>().unwrap()
    };
    let grads = weighted_sum(&forward(x.as_tensor()).unwrap(), &r)
        .unwrap()
        .backward()
        .unwrap();

    let mut params = vec![("x", x.clone())];
    params.extend(
        ["weight", "bias", "tau", "v"]
            .iter()
            .filter_map(|n| var(&varmap, n).map(|v| (*n, v))),
    );
    for (name, p) in params {
        let analytic = to_f64(grads.get(p.as_tensor()).expect("gradient"));
        let base = to_f64(p.as_tensor());
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                p.set(&Tensor::from_vec(v, p.shape(), p.device()).unwrap())
                    .unwrap();
                loss()
            };
            let numeric = (at(H) - at(-H)) / (2.0 * H);
            p.set(&Tensor::from_vec(base.clone(), p.shape(), p.device()).unwrap())
                .unwrap();
            assert!(
                (numeric - analytic[i]).abs() <= 1e-5 * numeric.abs().max(1.0),
                "{spec} {shape:?} train={train}: d/d{name}[{i}]: autograd {}, finite differences {numeric}",
                analytic[i]
            );
        }
    }
}

#[test]
fn batch_norm_gradients_match_finite_differences() {
    for spec in ["bn", "bn:affine=false", "bn:track_running_stats=false"] {
        for shape in [&[4, 3][..], &[2, 3, 5], &[2, 3, 2, 3], &[2, 2, 2, 2, 3]] {
            gradcheck(spec, shape, true);
            gradcheck(spec, shape, false);
        }
    }
}

#[test]
fn group_layer_instance_norm_gradients_match_finite_differences() {
    for spec in [
        "gn:groups=2",
        "gn:groups=1",
        "ln",
        "in",
        "in:track_running_stats=true",
    ] {
        for shape in [&[2, 4, 5][..], &[2, 4, 2, 3], &[1, 4, 2, 2, 2]] {
            gradcheck(spec, shape, true);
            gradcheck(spec, shape, false);
        }
    }
    gradcheck("ln", &[3, 5], true);
}

#[test]
fn remedy_and_batch_free_gradients_match_finite_differences() {
    for spec in [
        "rms",
        "frn",
        "frn:tlu=false",
        "evonorm-s0:groups=2",
        "evonorm-b0",
        // r and d get no gradient, so finite differences, which move them, check brn where
        // they are constant (1 and 0); the fixtures check the clipped gradients exactly.
        "brn:rmax=1,dmax=0",
        "ghostbn:virtual=2",
    ] {
        for shape in [&[5, 4, 3][..], &[3, 4, 2, 2]] {
            gradcheck(spec, shape, true);
            gradcheck(spec, shape, false);
        }
    }
    gradcheck("frn", &[3, 4, 1, 1], true);
    gradcheck("rms", &[3, 4], true);
}
