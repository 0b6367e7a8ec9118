//! `cargo bench -p normalizers`: each normalizer's training forward and forward+backward on the
//! kernels issue's shapes, f32, for the fused kernels, the reference twin and candle-nn's layer.
//! `experiments bench-norms` prints the same comparison as one table with ratios.

use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SHAPES: [[usize; 4]; 5] = [
    [2, 64, 56, 56],
    [32, 64, 56, 56],
    [32, 256, 14, 14],
    [8, 512, 7, 7],
    [32, 32, 32, 32],
];

type Forward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

fn layer(kind: &str, norm: &str, c: usize, varmap: &VarMap) -> Forward {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let spec = if norm == "gn" {
        "gn:groups=32".to_string()
    } else {
        norm.to_string()
    };
    match kind {
        "fused" | "reference" => {
            let spec = if kind == "reference" {
                format!(
                    "{spec}{}impl=reference",
                    if spec.contains(':') { ',' } else { ':' }
                )
            } else {
                spec
            };
            let n = normalizers::from_spec(&spec, c, vb).unwrap();
            Box::new(move |x| n.forward_t(x, true))
        }
        _ => match norm {
            "bn" => {
                let bn =
                    candle_nn::batch_norm(c, candle_nn::BatchNormConfig::default(), vb).unwrap();
                Box::new(move |x| bn.forward_t(x, true))
            }
            "ln" => {
                let (w, b) = (
                    Tensor::ones((1, c, 1, 1), DType::F32, &Device::Cpu).unwrap(),
                    Tensor::zeros((1, c, 1, 1), DType::F32, &Device::Cpu).unwrap(),
                );
                Box::new(move |x| {
                    let xc = x.broadcast_sub(&x.mean_keepdim((1, 2, 3))?)?;
                    let var = xc.sqr()?.mean_keepdim((1, 2, 3))?;
                    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
                        .broadcast_mul(&w)?
                        .broadcast_add(&b)
                })
            }
            _ => {
                let groups = if norm == "in" { c } else { 32 };
                let gn = candle_nn::group_norm(groups, c, 1e-5, vb).unwrap();
                Box::new(move |x| gn.forward(x))
            }
        },
    }
}

fn bench(c: &mut Criterion) {
    for shape in SHAPES {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap())
                .unwrap();
        let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap();
        let bytes = 4 * shape.iter().product::<usize>() as u64;
        let label = format!("{}x{}x{}x{}", shape[0], shape[1], shape[2], shape[3]);
        for norm in ["bn", "gn", "ln", "in"] {
            let mut group = c.benchmark_group(format!("{norm}/{label}"));
            group.throughput(Throughput::Bytes(bytes)).sample_size(10);
            for kind in ["fused", "reference", "candle-nn"] {
                let varmap = VarMap::new();
                let f = layer(kind, norm, shape[1], &varmap);
                group.bench_function(BenchmarkId::new("forward", kind), |b| {
                    b.iter(|| f(x.as_tensor()).unwrap())
                });
                group.bench_function(BenchmarkId::new("forward+backward", kind), |b| {
                    b.iter(|| {
                        (f(x.as_tensor()).unwrap() * &r)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap()
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
