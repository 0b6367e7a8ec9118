//! The fused kernels against their reference twins on random shapes, specs and dtypes,
//! contiguous and strided: outputs, input/weight/bias gradients and running statistics.

mod common;

use candle_core::{DType, Var};
use common::{assert_close, randomize_affine, reference_of, seeded, to_f64, var, weighted_sum};
use proptest::prelude::*;

const SPECS: [&str; 16] = [
    "bn",
    "bn:momentum=none,eps=1e-3",
    "bn:affine=false",
    "gn:groups=2",
    "gn:groups=1,affine=false",
    "ln",
    "in",
    "in:track_running_stats=true",
    "in:affine=false",
    "rms",
    "rms:affine=false",
    "frn",
    "frn:tlu=false,affine=false",
    "evonorm-s0:groups=2",
    "evonorm-s0:groups=1,affine=false",
    "brn:rmax=1.5,dmax=0.5",
];

/// Output, gradients and running statistics after two training steps and one evaluation.
fn outcome(
    spec: &str,
    shape: &[usize],
    dtype: DType,
    strided: bool,
    seed: u64,
) -> Vec<(String, Vec<f64>)> {
    let c = shape[1];
    let (norm, varmap) = common::build(spec, c, dtype);
    randomize_affine(&varmap, c, seed);
    let mut out = Vec::new();
    for (step, train) in [true, true, false].into_iter().enumerate() {
        let x = seeded(shape, seed + step as u64, 3.0, 2.0)
            .to_dtype(dtype)
            .unwrap();
        let (xv, view) = if strided {
            let v = Var::from_tensor(&x.transpose(0, 1).unwrap().contiguous().unwrap()).unwrap();
            let view = v.as_tensor().transpose(0, 1).unwrap();
            (v, view)
        } else {
            let v = Var::from_tensor(&x).unwrap();
            let view = v.as_tensor().clone();
            (v, view)
        };
        let y = norm.forward_t(&view, train).unwrap();
        let grads = weighted_sum(&y, &seeded(shape, 100 + seed, 0.0, 1.0))
            .unwrap()
            .backward()
            .unwrap();
        out.push((format!("y{step}"), to_f64(&y)));
        out.push((
            format!("dx{step}"),
            to_f64(grads.get(xv.as_tensor()).unwrap()),
        ));
        for name in ["weight", "bias", "tau", "v"] {
            if let Some(v) = var(&varmap, name) {
                out.push((
                    format!("d{name}{step}"),
                    to_f64(grads.get(v.as_tensor()).unwrap()),
                ));
            }
        }
        if let Some((m, v)) = norm.running_stats().unwrap() {
            out.push((format!("running_mean{step}"), to_f64(&m)));
            out.push((format!("running_var{step}"), to_f64(&v)));
        }
    }
    out
}

fn shape_strategy() -> impl Strategy<Value = Vec<usize>> {
    (
        2usize..4,
        1usize..3,
        prop::collection::vec(2usize..12, 1..4),
    )
        .prop_map(|(n, k, spatial)| {
            let mut shape = vec![n, 2 * k];
            shape.extend(spatial);
            shape
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fused_kernels_match_the_reference_ops(
        spec in prop::sample::select(SPECS.to_vec()),
        shape in shape_strategy(),
        dtype in prop::sample::select(vec![DType::F32, DType::F64, DType::BF16]),
        strided in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let tol = match dtype { DType::F64 => 1e-10, DType::F32 => 1e-4, _ => 0.05 };
        let fused = outcome(spec, &shape, dtype, strided, seed);
        let reference = outcome(&reference_of(spec), &shape, dtype, strided, seed);
        prop_assert_eq!(fused.len(), reference.len());
        for ((name, a), (_, b)) in fused.iter().zip(&reference) {
            assert_close(&format!("{spec} {shape:?} {dtype:?} strided={strided}: {name}"), a, b, tol);
        }
    }
}

/// The backward kernel on its own, with the forward's statistics or recomputing them, gives
/// autograd's gradients to the bit; and so does the lean forward (which keeps no statistics
/// for these small sets, so that its backward recomputes them).
#[test]
fn the_backward_kernel_alone_gives_the_autograd_gradients() {
    use normalizers::kernels::{
        fused_backward, fused_normalize, fused_normalize_lean, lean_keeps_stats, Sets,
    };
    let shape = [3, 4, 5, 7];
    for (sets, dtype) in [
        (Sets::Channels, DType::F32),
        (Sets::Groups(2), DType::F32),
        (Sets::Groups(4), DType::F64),
    ] {
        let x = Var::from_tensor(&seeded(&shape, 1, 2.0, 3.0).to_dtype(dtype).unwrap()).unwrap();
        let w = Var::from_tensor(&seeded(&[4], 2, 1.0, 0.5).to_dtype(dtype).unwrap()).unwrap();
        let b = Var::from_tensor(&seeded(&[4], 3, 0.0, 0.5).to_dtype(dtype).unwrap()).unwrap();
        let r = seeded(&shape, 4, 0.0, 1.0).to_dtype(dtype).unwrap();
        let (y, stats) =
            fused_normalize(x.as_tensor(), w.as_tensor(), b.as_tensor(), sets, 1e-5).unwrap();
        let grads = weighted_sum(&y, &r).unwrap().backward().unwrap();
        assert!(!lean_keeps_stats(&shape, sets, dtype).unwrap());
        let y_lean =
            fused_normalize_lean(x.as_tensor(), w.as_tensor(), b.as_tensor(), sets, 1e-5).unwrap();
        assert_close(
            &format!("{sets:?} lean y"),
            &to_f64(&y_lean),
            &to_f64(&y),
            0.0,
        );
        let lean_grads = weighted_sum(&y_lean, &r).unwrap().backward().unwrap();
        for kept in [Some(&*stats), None] {
            let (dx, dw, db) =
                fused_backward(x.as_tensor(), w.as_tensor(), &r, sets, kept, 1e-5).unwrap();
            for (name, got, var) in [("dx", &dx, &x), ("dw", &dw, &w), ("db", &db, &b)] {
                let want = to_f64(grads.get(var.as_tensor()).unwrap());
                let what = format!("{sets:?} {name}, statistics kept: {}", kept.is_some());
                assert_close(&what, &to_f64(got), &want, 0.0);
                let lean = to_f64(lean_grads.get(var.as_tensor()).unwrap());
                assert_close(&format!("{sets:?} lean {name}"), &lean, &want, 0.0);
            }
        }
    }
}

/// The fused backward writes dx over the output gradient candle hands it. Stack two layers
/// and use both outputs several ways (transposed, twice, multiplied together), in training
/// and evaluation: every gradient must still match the reference, which allocates.
#[test]
fn writing_dx_over_the_output_gradient_leaves_every_gradient_intact() {
    let shape = [3, 4, 5, 6];
    for spec in ["bn", "gn:groups=2", "ln", "in:track_running_stats=true"] {
        for train in [true, false] {
            let run = |spec: &str| {
                let (first, vm1) = common::build(spec, 4, DType::F64);
                let (second, vm2) = common::build(spec, 4, DType::F64);
                randomize_affine(&vm1, 4, 5);
                randomize_affine(&vm2, 4, 6);
                let x = Var::from_tensor(&seeded(&shape, 7, 1.0, 2.0)).unwrap();
                let r1 = seeded(&[3, 4, 6, 5], 8, 0.0, 1.0);
                let r2 = seeded(&shape, 9, 0.0, 1.0);
                let y1 = first.forward_t(x.as_tensor(), train).unwrap();
                let y2 = second.forward_t(&y1, train).unwrap();
                let loss = (weighted_sum(&y1.transpose(2, 3).unwrap(), &r1).unwrap()
                    + weighted_sum(&y2, &r2).unwrap()
                    + (&y1 * &y2).unwrap().sum_all().unwrap()
                    + y1.sum_all().unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                let mut out = vec![to_f64(grads.get(x.as_tensor()).unwrap())];
                for vm in [&vm1, &vm2] {
                    for name in ["weight", "bias"] {
                        let v = var(vm, name).unwrap();
                        out.push(to_f64(grads.get(v.as_tensor()).unwrap()));
                    }
                }
                // The loss's own inputs are untouched.
                out.push(to_f64(&r1));
                out.push(to_f64(&r2));
                out
            };
            let (fused, reference) = (run(spec), run(&reference_of(spec)));
            for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
                assert_close(&format!("{spec} train={train} #{i}"), a, b, 1e-10);
            }
        }
    }
}
