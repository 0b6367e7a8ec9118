//! Invariants of the remedies that the fixtures do not pin: `brn` with r and d clipped to 1
//! and 0 is `bn`; `ghostbn` with a virtual batch of the whole batch is `bn`; FRN's TLU splits
//! a tie's gradient as PyTorch; PreciseBN stores the pooled statistics of every value seen;
//! `bn` with per-device statistics over chunks of K is `ghostbn:virtual=K`.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, build, randomize_affine, seeded, to_f64, var, weighted_sum};

/// Output, gradients of x, weight and bias, and running statistics over two training steps
/// and an evaluation.
fn trace(spec: &str, shape: &[usize]) -> Vec<(String, Vec<f64>)> {
    trace_on(spec, None, shape)
}

/// [`trace`] of the layer with its training statistics per device of `device` samples.
fn trace_on(spec: &str, device: Option<usize>, shape: &[usize]) -> Vec<(String, Vec<f64>)> {
    let c = shape[1];
    let (norm, varmap) = build(spec, c, DType::F64);
    let norm = match device {
        Some(k) => normalizers::per_device(norm, k).unwrap(),
        None => norm,
    };
    randomize_affine(&varmap, c, 3);
    let mut out = Vec::new();
    for (step, train) in [true, true, false].into_iter().enumerate() {
        let x = Var::from_tensor(&seeded(shape, 10 + step as u64, 2.0, 1.5)).unwrap();
        let y = norm.forward_t(x.as_tensor(), train).unwrap();
        let g = weighted_sum(&y, &seeded(shape, 20, 0.0, 1.0))
            .unwrap()
            .backward()
            .unwrap();
        out.push((format!("y{step}"), to_f64(&y)));
        out.push((format!("dx{step}"), to_f64(g.get(x.as_tensor()).unwrap())));
        for name in ["weight", "bias"] {
            let v = var(&varmap, name).unwrap();
            out.push((
                format!("d{name}{step}"),
                to_f64(g.get(v.as_tensor()).unwrap()),
            ));
        }
        let (m, v) = norm.running_stats().unwrap().unwrap();
        out.push((format!("running_mean{step}"), to_f64(&m)));
        out.push((format!("running_var{step}"), to_f64(&v)));
    }
    out
}

fn assert_same_trace(a: &str, b: &str, shape: &[usize], tol: f64) {
    for ((name, x), (_, y)) in trace(a, shape).iter().zip(&trace(b, shape)) {
        assert_close(&format!("{a} vs {b} {shape:?}: {name}"), x, y, tol);
    }
}

#[test]
fn brn_without_room_to_correct_is_bn() {
    for shape in [&[4, 3][..], &[3, 3, 5], &[2, 3, 2, 3]] {
        for imp in ["fused", "reference"] {
            assert_same_trace(
                &format!("brn:rmax=1,dmax=0,impl={imp}"),
                &format!("bn:impl={imp}"),
                shape,
                1e-12,
            );
        }
    }
}

#[test]
fn ghostbn_with_the_whole_batch_as_its_virtual_batch_is_bn() {
    for shape in [&[4, 3][..], &[3, 3, 5]] {
        assert_same_trace("ghostbn:virtual=4", "bn", shape, 0.0);
        assert_same_trace(
            "ghostbn:virtual=64,momentum=none",
            "bn:momentum=none",
            shape,
            0.0,
        );
    }
}

#[test]
fn bn_with_per_device_statistics_is_ghostbn_and_batch_free_layers_are_left_alone() {
    // 6 samples: three devices of 2; 5 samples: the last device holds one.
    for shape in [&[6, 3][..], &[5, 3, 4], &[6, 2, 2, 3]] {
        for (a, b) in trace_on("bn", Some(2), shape)
            .iter()
            .zip(&trace("ghostbn:virtual=2", shape))
        {
            assert_close(
                &format!("per-device bn {shape:?}: {}", a.0),
                &a.1,
                &b.1,
                0.0,
            );
        }
    }
    // One device holding the whole batch is bn.
    for (a, b) in trace_on("bn", Some(8), &[6, 3, 2])
        .iter()
        .zip(&trace("bn", &[6, 3, 2]))
    {
        assert_close(&format!("one device: {}", a.0), &a.1, &b.1, 0.0);
    }
    let x = seeded(&[4, 4, 3], 7, 0.5, 2.0);
    for spec in ["gn:groups=2", "ln", "in"] {
        let (plain, _) = build(spec, 4, DType::F64);
        let wrapped = normalizers::per_device(build(spec, 4, DType::F64).0, 2).unwrap();
        assert_eq!(wrapped.spec(), plain.spec());
        let (y0, y1) = (
            plain.forward_t(&x, true).unwrap(),
            wrapped.forward_t(&x, true).unwrap(),
        );
        assert_close(spec, &to_f64(&y1), &to_f64(&y0), 0.0);
    }
    // Evaluation with batch statistics takes the whole evaluated batch.
    let (bn, _) = build("bn", 4, DType::F64);
    let x = seeded(&[6, 4, 3], 3, 1.0, 2.0);
    let whole = to_f64(&bn.forward_batch_stats(&x).unwrap());
    let wrapped = normalizers::per_device(bn, 2).unwrap();
    assert_close(
        "batch stats",
        &to_f64(&wrapped.forward_batch_stats(&x).unwrap()),
        &whole,
        0.0,
    );
    let e = normalizers::per_device(build("bn", 4, DType::F64).0, 0).unwrap_err();
    assert!(e.to_string().contains("at least 1"), "{e}");
    let wrapped = normalizers::per_device(build("bn", 4, DType::F64).0, 2).unwrap();
    let e = wrapped
        .forward_t(&seeded(&[4, 3, 2], 1, 0.0, 1.0), true)
        .unwrap_err();
    assert!(e.to_string().contains("built for 4"), "{e}");
}

#[test]
fn frn_splits_the_gradient_of_a_tie_between_the_input_and_tau() {
    // weight 0 and bias 0 (a zero-initialized residual branch) make y = 0 = tau everywhere.
    for spec in ["frn", "frn:impl=reference"] {
        let (norm, varmap) = build(spec, 3, DType::F64);
        var(&varmap, "weight")
            .unwrap()
            .set(&Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap())
            .unwrap();
        let x = Var::from_tensor(&seeded(&[2, 3, 4], 1, 0.5, 1.0)).unwrap();
        let y = norm.forward_t(x.as_tensor(), true).unwrap();
        assert!(to_f64(&y).iter().all(|&v| v == 0.0), "{spec}: y is tau");
        let r = seeded(&[2, 3, 4], 2, 0.0, 1.0);
        let g = weighted_sum(&y, &r).unwrap().backward().unwrap();
        let r3 = to_f64(&r);
        let per_channel = |c: usize| -> f64 {
            (0..2)
                .flat_map(|n| (0..4).map(move |s| n * 12 + c * 4 + s))
                .map(|i| r3[i])
                .sum()
        };
        let half: Vec<f64> = (0..3).map(|c| 0.5 * per_channel(c)).collect();
        for name in ["tau", "bias"] {
            let got = to_f64(g.get(var(&varmap, name).unwrap().as_tensor()).unwrap());
            assert_close(&format!("{spec}: d{name}"), &got, &half, 1e-12);
        }
    }
}

/// The mean and biased variance of every value of each channel of `batches`, in f64.
fn pooled(batches: &[Tensor]) -> (Vec<f64>, Vec<f64>) {
    let all = Tensor::cat(batches, 0).unwrap().transpose(0, 1).unwrap();
    let c = all.dim(0).unwrap();
    let all = all.contiguous().unwrap().reshape((c, ())).unwrap();
    let mean = all.mean_keepdim(1).unwrap();
    let var = all
        .broadcast_sub(&mean)
        .unwrap()
        .sqr()
        .unwrap()
        .mean(1)
        .unwrap();
    (to_f64(&mean), to_f64(&var))
}

#[test]
fn precise_statistics_are_the_pooled_statistics_of_every_value_seen() {
    // Batches of unequal size and very different means: a plain average of per-batch
    // statistics, or E[x²] − E[x]² in f32, would both miss.
    let batches: Vec<Tensor> = [(3, 1000.0), (5, 1003.0), (2, 990.0)]
        .iter()
        .enumerate()
        .map(|(i, &(n, offset))| seeded(&[n, 3, 2, 2], 40 + i as u64, offset, 0.5))
        .collect();
    for spec in [
        "bn",
        "bn:momentum=none",
        "ghostbn:virtual=2",
        "brn",
        "evonorm-b0",
    ] {
        for dtype in [DType::F64, DType::F32] {
            // The pooled statistics of the values as the layer sees them (rounded to f32).
            let seen: Vec<Tensor> = batches
                .iter()
                .map(|b| b.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap())
                .collect();
            let (mean, pooled_var) = pooled(&seen);
            let (norm, varmap) = build(spec, 3, dtype);
            assert!(
                norm.start_precise_stats().unwrap(),
                "{spec} keeps statistics"
            );
            for b in &batches {
                norm.forward_t(&b.to_dtype(dtype).unwrap(), true).unwrap();
            }
            norm.finish_precise_stats().unwrap();
            let got_var = to_f64(var_of(&varmap, "running_var").as_tensor());
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            assert_close(
                &format!("{spec} {dtype:?}: running_var"),
                &got_var,
                &pooled_var,
                tol,
            );
            if let Some(m) = var(&varmap, "running_mean") {
                assert_close(
                    &format!("{spec} {dtype:?}: running_mean"),
                    &to_f64(m.as_tensor()),
                    &mean,
                    tol,
                );
            }
            if let Some(k) = var(&varmap, "num_batches_tracked") {
                assert_eq!(to_f64(k.as_tensor()), vec![0.0], "{spec}: no steps counted");
            }
            // Back to the usual updates: the next batch moves the statistics by momentum.
            norm.forward_t(&batches[0].to_dtype(dtype).unwrap(), true)
                .unwrap();
            let moved = to_f64(var_of(&varmap, "running_var").as_tensor());
            assert_ne!(moved, got_var, "{spec}: updates resume after finish");
        }
    }
    for spec in [
        "gn:groups=3",
        "ln",
        "rms",
        "frn",
        "evonorm-s0:groups=3",
        "none",
    ] {
        let (norm, _) = build(spec, 3, DType::F32);
        assert!(
            !norm.start_precise_stats().unwrap(),
            "{spec} keeps no statistics"
        );
        norm.finish_precise_stats().unwrap();
    }
    let (norm, _) = build("bn", 3, DType::F32);
    norm.start_precise_stats().unwrap();
    let e = norm.finish_precise_stats().unwrap_err().to_string();
    assert!(e.contains("no training batch"), "{e}");
}

fn var_of(varmap: &candle_nn::VarMap, name: &str) -> Var {
    var(varmap, name).unwrap_or_else(|| panic!("no {name}"))
}
