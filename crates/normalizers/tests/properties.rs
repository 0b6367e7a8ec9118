//! Property tests on random shapes, values and specs: normalized groups have zero mean and the
//! variance v/(v + eps), GroupNorm with one group is LayerNorm, GroupNorm with C groups is
//! InstanceNorm, and specs round-trip.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, build, randomize_affine, to_f64};
use normalizers::{
    BatchNormConfig, Common, GroupNormConfig, Impl, InstanceNormConfig, LayerNormConfig, Momentum,
    NormSpec,
};
use proptest::prelude::*;

/// (N, C, spatial...) with C a multiple of `groups`, and values with per-tensor offset and scale.
fn input(groups: usize) -> impl Strategy<Value = (Vec<usize>, Vec<f64>)> {
    (
        1usize..4,
        1usize..4,
        prop::collection::vec(1usize..5, 0..3),
        -50.0f64..50.0,
        0.1f64..10.0,
    )
        .prop_flat_map(move |(n, k, spatial, offset, scale)| {
            let mut shape = vec![n, groups * k];
            shape.extend(spatial);
            let len: usize = shape.iter().product();
            let values = prop::collection::vec(-1.0f64..1.0, len)
                .prop_map(move |v| v.into_iter().map(|u| offset + scale * u).collect());
            (Just(shape), values)
        })
}

fn tensor(shape: &[usize], values: &[f64]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Index sets of the normalization groups of a (N, C, S) tensor in row-major order:
/// `by_channel` groups channel c of all samples (BatchNorm), otherwise each sample's `groups`
/// runs of consecutive channels.
fn group_members(shape: &[usize], groups: usize, by_channel: bool) -> Vec<Vec<usize>> {
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let mut sets = vec![Vec::new(); if by_channel { c } else { n * groups }];
    for i in 0..n {
        for ch in 0..c {
            let set = if by_channel {
                ch
            } else {
                i * groups + ch / (c / groups)
            };
            sets[set].extend((0..s).map(|j| (i * c + ch) * s + j));
        }
    }
    sets
}

fn mean_var(values: &[f64], idx: &[usize]) -> (f64, f64) {
    let m = idx.len() as f64;
    let mean = idx.iter().map(|&i| values[i]).sum::<f64>() / m;
    let var = idx.iter().map(|&i| (values[i] - mean).powi(2)).sum::<f64>() / m;
    (mean, var)
}

fn check_standardized(spec: &str, groups: usize, by_channel: bool, shape: &[usize], x: &[f64]) {
    let (norm, _) = build(spec, shape[1], DType::F64);
    let y = to_f64(&norm.forward_t(&tensor(shape, x), true).unwrap());
    for idx in group_members(shape, groups, by_channel) {
        let (_, v_in) = mean_var(x, &idx);
        let (m_out, v_out) = mean_var(&y, &idx);
        assert!(m_out.abs() < 1e-9, "{spec} {shape:?}: group mean {m_out}");
        let expected = v_in / (v_in + 1e-5);
        assert!(
            (v_out - expected).abs() < 1e-9,
            "{spec} {shape:?}: variance {v_out}, expected {expected}"
        );
    }
}

fn same_output(a: &str, b: &str, shape: &[usize], x: &[f64], train: bool) {
    let c = shape[1];
    let (na, va) = build(a, c, DType::F64);
    let (nb, vb) = build(b, c, DType::F64);
    randomize_affine(&va, c, 5);
    randomize_affine(&vb, c, 5);
    let x = tensor(shape, x);
    let ya = to_f64(&na.forward_t(&x, train).unwrap());
    let yb = to_f64(&nb.forward_t(&x, train).unwrap());
    assert_close(&format!("{a} vs {b} on {shape:?}"), &ya, &yb, 1e-12);
}

fn spec_strategy() -> impl Strategy<Value = NormSpec> {
    let eps = prop_oneof![Just(1e-5), 1e-9f64..1.0];
    let momentum = prop_oneof![
        Just(Momentum::Exponential(0.1)),
        (0.0f64..=1.0).prop_map(Momentum::Exponential),
        Just(Momentum::Cumulative)
    ];
    let exp_momentum = (0.0f64..=1.0).prop_map(Momentum::Exponential);
    let imp = prop_oneof![Just(Impl::Fused), Just(Impl::Reference)];
    prop_oneof![
        (
            momentum,
            eps.clone(),
            any::<bool>(),
            any::<bool>(),
            imp.clone()
        )
            .prop_map(|(momentum, eps, affine, track_running_stats, imp)| {
                NormSpec::Batch(BatchNormConfig {
                    momentum,
                    track_running_stats,
                    common: Common { eps, affine, imp },
                })
            }),
        (1usize..64, eps.clone(), any::<bool>(), imp.clone()).prop_map(
            |(groups, eps, affine, imp)| NormSpec::Group(GroupNormConfig {
                groups,
                common: Common { eps, affine, imp },
            })
        ),
        (eps.clone(), any::<bool>(), imp.clone()).prop_map(|(eps, affine, imp)| {
            NormSpec::Layer(LayerNormConfig {
                common: Common { eps, affine, imp },
            })
        }),
        (eps, any::<bool>(), any::<bool>(), exp_momentum, imp).prop_map(
            |(eps, affine, track_running_stats, momentum, imp)| {
                NormSpec::Instance(InstanceNormConfig {
                    track_running_stats,
                    momentum,
                    common: Common { eps, affine, imp },
                })
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn group_norm_standardizes_each_group((shape, x) in input(3)) {
        check_standardized("gn:groups=3", 3, false, &shape, &x);
    }

    #[test]
    fn layer_norm_standardizes_each_sample((shape, x) in input(1)) {
        check_standardized("ln", 1, false, &shape, &x);
    }

    #[test]
    fn batch_norm_standardizes_each_channel_in_training((shape, x) in input(1)) {
        prop_assume!(shape[0] * shape[2..].iter().product::<usize>() > 1);
        check_standardized("bn", 1, true, &shape, &x);
    }

    #[test]
    fn instance_norm_standardizes_each_channel_of_each_sample((shape, x) in input(1)) {
        prop_assume!(shape[2..].iter().product::<usize>() > 1);
        let c = shape[1];
        check_standardized("in", c, false, &shape, &x);
    }

    #[test]
    fn group_norm_with_one_group_is_layer_norm((shape, x) in input(1), train in any::<bool>()) {
        same_output("gn:groups=1", "ln", &shape, &x, train);
    }

    #[test]
    fn group_norm_with_c_groups_is_instance_norm((shape, x) in input(1), train in any::<bool>()) {
        prop_assume!(shape[2..].iter().product::<usize>() > 1);
        same_output(&format!("gn:groups={}", shape[1]), "in", &shape, &x, train);
    }

    #[test]
    fn specs_round_trip(spec in spec_strategy()) {
        let text = spec.to_string();
        prop_assert_eq!(text.parse::<NormSpec>().unwrap(), spec.clone());
        let c = match &spec { NormSpec::Group(g) => g.groups * 2, _ => 6 };
        let (norm, _) = build(&text, c, DType::F32);
        prop_assert_eq!(norm.norm_spec(), &spec);
        prop_assert_eq!(norm.spec(), text);
    }
}
