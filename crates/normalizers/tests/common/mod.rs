//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use normalizers::Normalizer;

/// A normalizer whose variables live in a fresh `VarMap` of `dtype`, with no name prefix.
pub fn build(spec: &str, c: usize, dtype: DType) -> (Box<dyn Normalizer>, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let norm = normalizers::from_spec(spec, c, vb).unwrap_or_else(|e| panic!("{spec}: {e}"));
    (norm, varmap)
}

pub fn var(varmap: &VarMap, name: &str) -> Option<Var> {
    varmap.data().lock().unwrap().get(name).cloned()
}

pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .unwrap()
}

/// Asserts |actual − expected| ≤ tol · max(1, |expected|) elementwise.
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], tol: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * e.abs().max(1.0),
            "{what}[{i}]: got {a}, expected {e} (tol {tol})"
        );
    }
}

/// Sum of y · r: the loss whose gradients the fixtures hold.
pub fn weighted_sum(y: &Tensor, r: &Tensor) -> Result<Tensor> {
    (y * r.to_dtype(y.dtype())?)?.sum_all()
}

/// A deterministic pseudo-random tensor of `shape`, `offset + scale · N(0, 1)`-like values.
pub fn seeded(shape: &[usize], seed: u64, offset: f64, scale: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            offset
                + scale
                    * (rng.random::<f64>() + rng.random::<f64>() + rng.random::<f64>() - 1.5)
                    * 2.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Sets `weight`, `bias`, `tau` and `v` (where the normalizer has them) to seeded values.
pub fn randomize_affine(varmap: &VarMap, c: usize, seed: u64) {
    let params = [
        ("weight", 1.0, 0.5),
        ("bias", 0.0, 0.5),
        ("tau", -0.2, 0.3),
        ("v", 0.5, 0.8),
    ];
    for (i, (name, offset, scale)) in params.iter().enumerate() {
        if let Some(v) = var(varmap, name) {
            let t = seeded(&[c], seed + i as u64, *offset, *scale);
            v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
        }
    }
}

/// `spec` with `impl=reference` added: the composite twin of the same normalizer.
pub fn reference_of(spec: &str) -> String {
    let sep = if spec.contains(':') { ',' } else { ':' };
    format!("{spec}{sep}impl=reference")
}

/// The spec as given (fused kernels by default) and its reference twin.
pub fn both_impls(spec: &str) -> [String; 2] {
    [spec.to_string(), reference_of(spec)]
}
