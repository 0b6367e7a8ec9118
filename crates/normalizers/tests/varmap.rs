//! Variables live in the `VarMap` under PyTorch's names: `VarMap::save` writes a model with its
//! running statistics as safetensors and `VarMap::load` restores it.

mod common;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use common::{assert_close, seeded, to_f64};
use normalizers::Normalizer;

const SPECS: [&str; 6] = [
    "bn",
    "bn:momentum=none",
    "gn:groups=2",
    "ln",
    "in",
    "in:track_running_stats=true",
];

fn model(varmap: &VarMap) -> Vec<Box<dyn Normalizer>> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    SPECS
        .iter()
        .enumerate()
        .map(|(i, spec)| normalizers::from_spec(spec, 4, vb.pp(format!("norm{i}"))).unwrap())
        .collect()
}

#[test]
fn variables_carry_pytorch_names_and_initial_values() {
    let varmap = VarMap::new();
    let _model = model(&varmap);
    let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    let expected = [
        "norm0.bias",
        "norm0.running_mean",
        "norm0.running_var",
        "norm0.weight",
        "norm1.bias",
        "norm1.num_batches_tracked",
        "norm1.running_mean",
        "norm1.running_var",
        "norm1.weight",
        "norm2.bias",
        "norm2.weight",
        "norm3.bias",
        "norm3.weight",
        "norm4.bias",
        "norm4.weight",
        "norm5.bias",
        "norm5.running_mean",
        "norm5.running_var",
        "norm5.weight",
    ];
    assert_eq!(names, expected);
    let data = varmap.data().lock().unwrap();
    for (suffix, init) in [
        ("weight", 1.0),
        ("bias", 0.0),
        ("running_mean", 0.0),
        ("running_var", 1.0),
    ] {
        for (name, var) in data.iter().filter(|(n, _)| n.ends_with(suffix)) {
            assert_eq!(var.dims(), [4], "{name}");
            assert!(to_f64(var.as_tensor()).iter().all(|v| *v == init), "{name}");
        }
    }
}

#[test]
fn save_and_load_round_trip_running_statistics() {
    let path = std::env::temp_dir().join(format!(
        "normbench-varmap-{}.safetensors",
        std::process::id()
    ));
    let trained = VarMap::new();
    let model_a = model(&trained);
    for step in 0..3 {
        for norm in &model_a {
            norm.forward_t(
                &seeded(&[3, 4, 5], step, 2.0, 3.0)
                    .to_dtype(DType::F32)
                    .unwrap(),
                true,
            )
            .unwrap();
        }
    }
    trained.save(&path).unwrap();

    let mut restored = VarMap::new();
    let model_b = model(&restored);
    restored.load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();

    let x = seeded(&[2, 4, 5], 99, 2.0, 3.0)
        .to_dtype(DType::F32)
        .unwrap();
    for (a, b) in model_a.iter().zip(&model_b) {
        let (ya, yb) = (
            a.forward_t(&x, false).unwrap(),
            b.forward_t(&x, false).unwrap(),
        );
        assert_close(&a.spec(), &to_f64(&yb), &to_f64(&ya), 0.0);
        match (a.running_stats().unwrap(), b.running_stats().unwrap()) {
            (Some((ma, va)), Some((mb, vb))) => {
                assert!(
                    to_f64(&ma).iter().any(|m| *m != 0.0),
                    "{}: trained",
                    a.spec()
                );
                assert_close(&a.spec(), &to_f64(&mb), &to_f64(&ma), 0.0);
                assert_close(&a.spec(), &to_f64(&vb), &to_f64(&va), 0.0);
            }
            (None, None) => {}
            _ => panic!("{}: running statistics differ in presence", a.spec()),
        }
    }
    let count = restored.data().lock().unwrap()["norm1.num_batches_tracked"]
        .as_tensor()
        .clone();
    assert_eq!(
        count
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        3.0
    );
}
