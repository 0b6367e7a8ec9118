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
