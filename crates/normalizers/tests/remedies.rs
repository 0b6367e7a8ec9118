//! The remedies and batch-free layers (`rms`, `frn`, `evonorm-s0`, `evonorm-b0`, `brn`,
//! `ghostbn`) against values computed independently in float64 numpy
//! (`scripts/make_fixtures.py` writes `tests/fixtures/remedies.json`, gradients by the complex
//! step): two training steps (outputs and every gradient), the running statistics after them,
//! and evaluation, with the fused kernels and the reference ops, in f64 and f32.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use common::{assert_close, both_impls, build, to_f64, var, weighted_sum};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    spec: String,
    shape: Vec<usize>,
    xs: Vec<Vec<f64>>,
    r: Vec<f64>,
    params: BTreeMap<String, Vec<f64>>,
    init: BTreeMap<String, Vec<f64>>,
    steps: Vec<Expected>,
    after: BTreeMap<String, Vec<f64>>,
    eval: Expected,
}

#[derive(Deserialize)]
struct Expected {
    y: Vec<f64>,
    grads: BTreeMap<String, Vec<f64>>,
}

fn fixtures() -> Fixtures {
    serde_json::from_str(include_str!("fixtures/remedies.json")).expect("fixtures parse")
}

/// Stores `values` in the variable `name`, which must exist, in its shape and dtype.
fn set(varmap: &VarMap, name: &str, values: &[f64], what: &str) {
    let v = var(varmap, name).unwrap_or_else(|| panic!("{what}: no variable {name}"));
    let t = Tensor::from_vec(values.to_vec(), v.shape(), &Device::Cpu).unwrap();
    v.set(&t.to_dtype(v.dtype()).unwrap()).unwrap();
}

fn check_case(case: &Case, spec: &str, dtype: DType, tol: f64) {
    let c = case.shape[1];
    let (norm, varmap) = build(spec, c, dtype);
    let what = |part: &str| format!("{spec} {:?} {dtype:?}: {part}", case.shape);
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let mut expected: Vec<String> = case
        .params
        .keys()
        .chain(case.init.keys())
        .cloned()
        .collect();
    expected.sort();
    assert_eq!(names, expected, "{}", what("variables"));
    for (name, values) in case.params.iter().chain(&case.init) {
        set(&varmap, name, values, &what("init"));
    }
    let r = Tensor::from_vec(case.r.clone(), case.shape.as_slice(), &Device::Cpu).unwrap();
    let check = |train: bool, x: &[f64], exp: &Expected, step: &str| {
        let t = Tensor::from_vec(x.to_vec(), case.shape.as_slice(), &Device::Cpu).unwrap();
        let xv = Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
        let y = norm.forward_t(xv.as_tensor(), train).unwrap();
        assert_eq!(y.dtype(), dtype);
        assert_close(&what(&format!("{step} y")), &to_f64(&y), &exp.y, tol);
        let grads = weighted_sum(&y, &r).unwrap().backward().unwrap();
        for (name, g) in &exp.grads {
            let t = if name == "x" {
                xv.clone()
            } else {
                var(&varmap, name).unwrap()
            };
            let got = grads
                .get(t.as_tensor())
                .unwrap_or_else(|| panic!("{}", what(&format!("{step}: no gradient for {name}"))));
            assert_close(&what(&format!("{step} d{name}")), &to_f64(got), g, tol);
        }
        for name in case.init.keys() {
            let v = var(&varmap, name).unwrap();
            assert!(
                grads.get(v.as_tensor()).is_none(),
                "{}",
                what("state has no gradient")
            );
        }
    };
    for (k, (x, exp)) in case.xs.iter().zip(&case.steps).enumerate() {
        check(true, x, exp, &format!("train step {}", k + 1));
    }
    for (name, values) in &case.after {
        let got = to_f64(var(&varmap, name).unwrap().as_tensor());
        assert_close(&what(&format!("{name} after two steps")), &got, values, tol);
    }
    check(false, &case.xs[0], &case.eval, "eval");
}

#[test]
fn remedies_and_batch_free_layers_match_numpy_in_f64() {
    let cases = fixtures().cases;
    assert!(cases.len() >= 30);
    for case in &cases {
        for spec in both_impls(&case.spec) {
            check_case(case, &spec, DType::F64, 1e-9);
        }
    }
}

#[test]
fn remedies_and_batch_free_layers_match_numpy_in_f32() {
    for case in &fixtures().cases {
        for spec in both_impls(&case.spec) {
            check_case(case, &spec, DType::F32, 5e-4);
        }
    }
}
