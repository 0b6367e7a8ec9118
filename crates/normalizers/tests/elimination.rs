//! BatchNorm can learn to undo itself: in training, with weight = sqrt(var_B + eps) and bias =
//! μ_B of the batch (biased variance, per channel), y = x̂ · weight + bias gives back the batch.
//! Checked for both implementations, with a large mean relative to the spread, where statistics
//! taken carelessly in f32 would not give it back.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

/// Per-channel mean and biased variance of an (N, C, H, W) f32 tensor, in f64.
fn channel_stats(x: &[f32], (n, c, s): (usize, usize, usize)) -> (Vec<f64>, Vec<f64>) {
    let m = (n * s) as f64;
    let mut mean = vec![0f64; c];
    let mut var = vec![0f64; c];
    for ch in 0..c {
        let values = (0..n).flat_map(|i| (0..s).map(move |j| (i * c + ch) * s + j));
        let vals: Vec<f64> = values.map(|k| x[k] as f64).collect();
        mean[ch] = vals.iter().sum::<f64>() / m;
        var[ch] = vals.iter().map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / m;
    }
    (mean, var)
}

#[test]
fn batchnorm_with_the_batch_s_own_statistics_as_affine_returns_the_batch() {
    let (n, c, h, w) = (4, 3, 5, 5);
    let len = n * c * h * w;
    // Deterministic values: channel offsets 100, −40, 7 and spreads 0.5, 3, 0.01.
    let x: Vec<f32> = (0..len)
        .map(|k| {
            let ch = (k / (h * w)) % c;
            let u = ((k * 7919) % 1000) as f32 / 1000.0 - 0.5;
            [100.0, -40.0, 7.0][ch] + [0.5, 3.0, 0.01][ch] * u
        })
        .collect();
    let (mean, var) = channel_stats(&x, (n, c, h * w));
    for spec in ["bn", "bn:impl=reference"] {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let norm = normalizers::from_spec(spec, c, vb).unwrap();
        let eps = norm.norm_spec().eps();
        let set = |name: &str, v: Vec<f32>| {
            let t = Tensor::from_vec(v, c, &Device::Cpu).unwrap();
            varmap.data().lock().unwrap()[name].set(&t).unwrap();
        };
        set(
            "weight",
            var.iter().map(|v| (v + eps).sqrt() as f32).collect(),
        );
        set("bias", mean.iter().map(|&m| m as f32).collect());
        let input = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let y: Vec<f32> = norm
            .forward_t(&input, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (k, (a, b)) in x.iter().zip(&y).enumerate() {
            // f32 rounding of values near |x|: a few ulps of the channel's offset.
            let tol = 4.0 * f32::EPSILON * a.abs().max(1.0);
            assert!((a - b).abs() <= tol, "{spec}: element {k}: {a} became {b}");
        }
    }
}
