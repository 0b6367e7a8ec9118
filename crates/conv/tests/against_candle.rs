//! The fast convolution against candle's own `conv2d` (forward, input, weight and bias
//! gradients) and against direct loops on random geometries, and against finite differences in
//! f64.
//!
//! Candle 0.11's `conv2d` backward derives the transposed convolution's output padding from the
//! height alone and panics (capacity overflow) on some strided geometries, so its gradients are
//! compared on square inputs at stride 1 only; the direct loops cover every geometry.

use candle_core::{DType, Device, Module, Tensor, Var};
use conv::{conv2d_with, Conv2d, Conv2dConfig, ConvImpl};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    for (i, (x, y)) in values(a).iter().zip(values(b)).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[derive(Debug, Clone)]
struct Case {
    x: Vec<usize>,
    w: Vec<usize>,
    cfg: Conv2dConfig,
}

impl Case {
    /// A square `kernel` over input `x` with `c_out` outputs, `stride`, and "same" padding
    /// (kernel / 2), no dilation: the model's layers.
    fn same(x: [usize; 4], c_out: usize, kernel: usize, stride: usize) -> Self {
        Case {
            x: x.to_vec(),
            w: vec![c_out, x[1], kernel, kernel],
            cfg: Conv2dConfig {
                stride,
                padding: kernel / 2,
                dilation: 1,
            },
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        1usize..4,
        1usize..5,
        1usize..5,
        1usize..10,
        prop_oneof![Just(0usize), 1usize..10],
        1usize..4,
        1usize..4,
        1usize..4,
        0usize..3,
        1usize..3,
    )
        .prop_filter_map(
            "kernel must fit",
            |(n, ci, co, h, w, kh, kw, stride, padding, dilation)| {
                let w = if w == 0 { h } else { w }; // square inputs often, to compare candle's gradients
                let span = |k: usize| dilation * (k - 1) + 1;
                (h + 2 * padding >= span(kh) && w + 2 * padding >= span(kw)).then(|| Case {
                    x: vec![n, ci, h, w],
                    w: vec![co, ci, kh, kw],
                    cfg: Conv2dConfig {
                        stride,
                        padding,
                        dilation,
                    },
                })
            },
        )
}

/// Output and gradients of sum(conv(x) · r) for x, weight and bias.
fn run(case: &Case, kind: ConvImpl, dtype: DType) -> [Tensor; 4] {
    let x = Var::from_tensor(&random(&case.x, 1, dtype)).unwrap();
    let w = Var::from_tensor(&random(&case.w, 2, dtype)).unwrap();
    let b = Var::from_tensor(&random(&case.w[..1], 3, dtype)).unwrap();
    let layer = Conv2d::new(
        w.as_tensor().clone(),
        Some(b.as_tensor().clone()),
        case.cfg,
        kind,
    );
    let y = layer.forward(x.as_tensor()).unwrap();
    let r = random(y.dims(), 4, dtype);
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    [y.clone(), g(&x), g(&w), g(&b)]
}

/// Output and gradients of sum(conv(x) · r) by direct loops over every index, in f64.
fn direct(case: &Case, dtype: DType) -> [Tensor; 4] {
    let (x, w, b) = (
        values(&random(&case.x, 1, dtype)),
        values(&random(&case.w, 2, dtype)),
        values(&random(&case.w[..1], 3, dtype)),
    );
    let g = conv::geometry(&case.x, &case.w, case.cfg).unwrap();
    let co = case.w[0];
    let yshape = [g.n, co, g.oh, g.ow];
    let r = values(&random(&yshape, 4, dtype));
    let (mut y, mut dx, mut dw, mut db) = (
        vec![0.0; r.len()],
        vec![0.0; x.len()],
        vec![0.0; w.len()],
        vec![0.0; co],
    );
    let (c, cfg) = (g.c_in, case.cfg);
    for n in 0..g.n {
        for o in 0..co {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let yi = ((n * co + o) * g.oh + oy) * g.ow + ox;
                    y[yi] = b[o];
                    db[o] += r[yi];
                    for ci in 0..c {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * cfg.stride + ky * cfg.dilation) as isize
                                    - cfg.padding as isize;
                                let ix = (ox * cfg.stride + kx * cfg.dilation) as isize
                                    - cfg.padding as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * c + ci) * g.h + iy as usize) * g.w + ix as usize;
                                let wi = ((o * c + ci) * g.kh + ky) * g.kw + kx;
                                y[yi] += x[xi] * w[wi];
                                dx[xi] += r[yi] * w[wi];
                                dw[wi] += r[yi] * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    let t = |v: Vec<f64>, s: &[usize]| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
    [
        t(y, &yshape),
        t(dx, &case.x),
        t(dw, &case.w),
        t(db, &case.w[..1]),
    ]
}

fn compare(case: &Case, dtype: DType, tol: f64) {
    let fast = run(case, ConvImpl::Fast, dtype);
    let names = ["y", "dx", "dweight", "dbias"];
    for (name, (a, b)) in names.iter().zip(fast.iter().zip(&direct(case, dtype))) {
        assert_close(
            &format!("{case:?} {dtype:?} {name} vs direct loops"),
            a,
            b,
            tol,
        );
    }
    let candle_y = conv2d_with(
        &random(&case.x, 1, dtype),
        &random(&case.w, 2, dtype),
        Some(&random(&case.w[..1], 3, dtype)),
        case.cfg,
        ConvImpl::Candle,
    )
    .unwrap();
    assert_close(
        &format!("{case:?} {dtype:?} y vs candle"),
        &fast[0],
        &candle_y,
        tol,
    );
    if case.x[2] == case.x[3] && case.cfg.stride == 1 {
        let candle = run(case, ConvImpl::Candle, dtype);
        for (name, (a, b)) in names.iter().zip(fast.iter().zip(&candle)) {
            assert_close(&format!("{case:?} {dtype:?} {name} vs candle"), a, b, tol);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn matches_candle_conv2d_in_f64(case in case()) {
        compare(&case, DType::F64, 1e-10);
    }

    #[test]
    fn matches_candle_conv2d_in_f32(case in case()) {
        compare(&case, DType::F32, 1e-4);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let cases = [
        Case {
            x: vec![2, 2, 5, 4],
            w: vec![3, 2, 3, 3],
            cfg: Conv2dConfig {
                stride: 1,
                padding: 1,
                dilation: 1,
            },
        },
        Case {
            x: vec![1, 3, 7, 6],
            w: vec![2, 3, 3, 2],
            cfg: Conv2dConfig {
                stride: 2,
                padding: 2,
                dilation: 2,
            },
        },
        Case {
            x: vec![2, 1, 4, 4],
            w: vec![2, 1, 1, 1],
            cfg: Conv2dConfig {
                stride: 3,
                padding: 0,
                dilation: 1,
            },
        },
    ];
    for case in cases {
        let [_, dx, dw, db] = run(&case, ConvImpl::Fast, DType::F64);
        let x0 = random(&case.x, 1, DType::F64);
        let w0 = random(&case.w, 2, DType::F64);
        let b0 = random(&case.w[..1], 3, DType::F64);
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            let y = conv2d_with(x, w, Some(b), case.cfg, ConvImpl::Fast).unwrap();
            let r = random(y.dims(), 4, DType::F64);
            (y * r).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let h = 1e-6;
        let bump = |t: &Tensor, i: usize, d: f64| {
            let mut v = values(t);
            v[i] += d;
            Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
        };
        for (which, analytic) in [(0, &dx), (1, &dw), (2, &db)] {
            let analytic = values(analytic);
            for (i, a) in analytic.iter().enumerate() {
                let at = |d: f64| match which {
                    0 => loss(&bump(&x0, i, d), &w0, &b0),
                    1 => loss(&x0, &bump(&w0, i, d), &b0),
                    _ => loss(&x0, &w0, &bump(&b0, i, d)),
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (numeric - a).abs() < 1e-6 * numeric.abs().max(1.0),
                    "{case:?} arg {which}[{i}]: {a} vs {numeric}"
                );
            }
        }
    }
}

#[test]
fn kernel_taps_that_only_see_padding() {
    // Found by the property test: with W=1, a 1x3 kernel dilated by 2 and padding 2, the outer
    // taps never touch the image.
    let shapes = [([1, 1, 1, 1], [1, 1, 1, 3]), ([2, 2, 3, 2], [2, 2, 3, 3])];
    for stride in [1, 2] {
        for (x, w) in shapes {
            let case = Case {
                x: x.to_vec(),
                w: w.to_vec(),
                cfg: Conv2dConfig {
                    stride,
                    padding: 2,
                    dilation: 2,
                },
            };
            compare(&case, DType::F64, 1e-10);
        }
    }
}

#[test]
fn no_input_gradient_when_the_input_needs_none() {
    let x = random(&[2, 3, 6, 6], 1, DType::F32);
    let w = Var::from_tensor(&random(&[4, 3, 3, 3], 2, DType::F32)).unwrap();
    let y = conv2d_with(
        &x,
        w.as_tensor(),
        None,
        Conv2dConfig::default(),
        ConvImpl::Fast,
    )
    .unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(w.as_tensor()).is_some());
}

/// The backward takes different paths by which operand needs a gradient (stride 1: the weight
/// gradient from dY's columns when the input gradient is computed, from x's otherwise): each
/// gradient alone must still be the definition's.
#[test]
fn each_gradient_alone_matches_the_definition() {
    for (stride, kernel) in [(1, 3), (1, 1), (2, 3), (1, 2)] {
        let case = Case::same([2, 3, 7, 6], 4, kernel, stride);
        let want = direct(&case, DType::F64);
        let r = random(want[0].dims(), 4, DType::F64);
        let (x, w) = (
            random(&case.x, 1, DType::F64),
            random(&case.w, 2, DType::F64),
        );
        for (x_grad, w_grad) in [(true, false), (false, true)] {
            let xv = Var::from_tensor(&x).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let xt = if x_grad {
                xv.as_tensor().clone()
            } else {
                x.clone()
            };
            let wt = if w_grad {
                wv.as_tensor().clone()
            } else {
                w.clone()
            };
            let y = conv2d_with(&xt, &wt, None, case.cfg, ConvImpl::Fast).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dw) = (grads.get(xv.as_tensor()), grads.get(wv.as_tensor()));
            assert_eq!((dx.is_some(), dw.is_some()), (x_grad, w_grad), "{case:?}");
            if let Some(dx) = dx {
                assert_close(&format!("{case:?} dx alone"), dx, &want[1], 1e-10);
            }
            if let Some(dw) = dw {
                assert_close(&format!("{case:?} dweight alone"), dw, &want[2], 1e-10);
            }
        }
    }
}

#[test]
fn bad_shapes_are_named() {
    let w = random(&[4, 3, 3, 3], 2, DType::F32);
    let err = |x: &[usize], cfg: Conv2dConfig| {
        conv2d_with(&random(x, 1, DType::F32), &w, None, cfg, ConvImpl::Fast)
            .unwrap_err()
            .to_string()
    };
    let d = Conv2dConfig::default();
    assert!(err(&[2, 5, 8, 8], d).contains("input has 5 channels"));
    assert!(err(&[2, 3, 8], d).contains("expected input (N, C, H, W)"));
    assert!(err(&[2, 3, 2, 8], d).contains("does not fit an input of 2x8"));
    assert!(err(&[2, 3, 8, 8], Conv2dConfig { stride: 0, ..d })
        .contains("stride and dilation must be at least 1"));
    let pad = Conv2dConfig { padding: 1, ..d };
    for empty in [[0, 3, 8, 8], [2, 3, 0, 8], [2, 3, 8, 0]] {
        let x = Tensor::zeros(&empty, DType::F32, &Device::Cpu).unwrap();
        for kind in [ConvImpl::Fast, ConvImpl::Candle] {
            let e = conv2d_with(&x, &w, None, pad, kind)
                .unwrap_err()
                .to_string();
            assert!(e.contains("no empty dimension"), "{empty:?} {kind}: {e}");
        }
    }
    let x64 = random(&[2, 3, 8, 8], 1, DType::F64);
    let e = conv2d_with(&x64, &w, None, d, ConvImpl::Fast)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input is F64 but the weight is F32"), "{e}");
    let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
    let e = conv2d_with(
        &half(&random(&[2, 3, 8, 8], 1, DType::F32)),
        &half(&w),
        None,
        d,
        ConvImpl::Fast,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("f32 or f64") && e.contains("--conv candle"),
        "{e}"
    );
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let case = Case {
        x: vec![4, 8, 9, 9],
        w: vec![6, 8, 3, 3],
        cfg: Conv2dConfig {
            stride: 1,
            padding: 1,
            dilation: 1,
        },
    };
    let with_threads = |n: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap();
        pool.install(|| run(&case, ConvImpl::Fast, DType::F32))
            .map(|t| values(&t))
    };
    assert_eq!(with_threads(1), with_threads(2));
}

/// Stride 1 takes two special paths: im2col's masked block copy when the output is as wide as
/// the input, and, when the kernel is square and padding ≤ dilation·(k − 1), the input gradient
/// as a convolution with the flipped kernel whose columns also give the weight gradient. Every
/// small geometry, on both sides of each condition.
#[test]
fn stride_one_geometries_exhaustively() {
    for (h, w) in [(1, 1), (2, 5), (5, 5), (6, 3)] {
        for (kh, kw) in [(1, 1), (2, 2), (3, 3), (3, 2)] {
            for dilation in 1..3 {
                for padding in 0..4 {
                    let span = |k: usize| dilation * (k - 1) + 1;
                    if h + 2 * padding < span(kh) || w + 2 * padding < span(kw) {
                        continue;
                    }
                    let case = Case {
                        x: vec![2, 3, h, w],
                        w: vec![2, 3, kh, kw],
                        cfg: Conv2dConfig {
                            stride: 1,
                            padding,
                            dilation,
                        },
                    };
                    compare(&case, DType::F64, 1e-10);
                }
            }
        }
    }
}

/// Strided layers keep their forward's columns for the weight gradient, and the first backward
/// takes them: a second backward through the same graph must recompute them and agree, and a
/// layer whose columns are not kept (stride 1, 3×3) must give what the direct loops give too.
#[test]
fn a_second_backward_through_one_graph_gives_the_same_gradients() {
    for (stride, kernel) in [(2, 3), (2, 1), (1, 1), (1, 3)] {
        let case = Case::same([3, 4, 8, 6], 5, kernel, stride);
        let x = Var::from_tensor(&random(&case.x, 1, DType::F64)).unwrap();
        let w = Var::from_tensor(&random(&case.w, 2, DType::F64)).unwrap();
        let y = conv2d_with(x.as_tensor(), w.as_tensor(), None, case.cfg, ConvImpl::Fast).unwrap();
        let r = random(y.dims(), 4, DType::F64);
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        let want = direct(&case, DType::F64);
        for grads in [&first, &second] {
            let dw = grads.get(w.as_tensor()).unwrap();
            let dx = grads.get(x.as_tensor()).unwrap();
            assert_close(&format!("{case:?} dweight"), dw, &want[2], 1e-10);
            assert_close(&format!("{case:?} dx"), dx, &want[1], 1e-10);
        }
    }
}
