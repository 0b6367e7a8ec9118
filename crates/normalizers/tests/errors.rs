//! Every bad input gets an `Err` whose message names the problem (never a panic).

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::build;

fn spec_error(spec: &str, c: usize) -> String {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    match normalizers::from_spec(spec, c, vb) {
        Ok(n) => panic!("{spec} with {c} channels was accepted as {}", n.spec()),
        Err(e) => e.to_string(),
    }
}

fn forward_error(spec: &str, c: usize, shape: &[usize], train: bool) -> String {
    let (norm, _) = build(spec, c, DType::F32);
    let x = Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    match norm.forward_t(&x, train) {
        Ok(_) => panic!("{spec} accepted an input of shape {shape:?} (train={train})"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "error {message:?} does not mention {part:?}"
        );
    }
}

#[test]
fn unknown_name_lists_the_valid_ones() {
    let e = spec_error("bx", 4);
    assert_mentions(&e, &["unknown normalizer \"bx\"", "bn", "gn", "ln", "in"]);
    assert_mentions(&spec_error("", 4), &["empty normalizer spec", "bn"]);
}

#[test]
fn unknown_option_lists_the_valid_ones() {
    let e = spec_error("gn:momentum=0.1", 4);
    assert_mentions(
        &e,
        &["unknown option \"momentum\"", "gn", "groups, eps, affine"],
    );
    assert_mentions(
        &spec_error("ln:groups=2", 4),
        &["unknown option \"groups\""],
    );
}

#[test]
fn unparsable_values_are_named() {
    assert_mentions(
        &spec_error("bn:momentum=fast", 4),
        &["momentum=\"fast\"", "[0, 1] or none"],
    );
    assert_mentions(
        &spec_error("bn:eps=tiny", 4),
        &["eps=\"tiny\"", "not a finite number"],
    );
    assert_mentions(
        &spec_error("gn:groups=two", 4),
        &["groups=\"two\"", "positive whole number"],
    );
    assert_mentions(
        &spec_error("ln:affine=yes", 4),
        &["affine=\"yes\"", "true or false"],
    );
    assert_mentions(&spec_error("bn:eps=nan", 4), &["not a finite number"]);
}

#[test]
fn out_of_range_values_are_named() {
    assert_mentions(
        &spec_error("bn:momentum=1.5", 4),
        &["momentum=1.5", "out of range"],
    );
    assert_mentions(&spec_error("bn:momentum=-0.1", 4), &["out of range"]);
    assert_mentions(&spec_error("in:eps=0", 4), &["eps=0", "must be > 0"]);
    assert_mentions(
        &spec_error("gn:groups=0", 4),
        &["groups=\"0\"", "positive whole number"],
    );
    assert_mentions(
        &spec_error("in:momentum=none", 4),
        &["momentum=none", "not supported for in"],
    );
}

#[test]
fn malformed_and_repeated_options_are_named() {
    assert_mentions(
        &spec_error("gn:groups", 4),
        &["malformed option \"groups\"", "key=value"],
    );
    assert_mentions(&spec_error("bn:", 4), &["malformed option"]);
    assert_mentions(
        &spec_error("bn:eps=1e-3,eps=1e-4", 4),
        &["eps is given twice"],
    );
}

#[test]
fn groups_must_divide_channels() {
    let e = spec_error("gn:groups=4", 6);
    assert_mentions(
        &e,
        &["groups=4 does not divide num_channels=6", "1, 2, 3, 6"],
    );
    assert_mentions(
        &spec_error("gn", 16),
        &["groups=32 does not divide num_channels=16"],
    );
}

#[test]
fn zero_channels_are_refused() {
    assert_mentions(&spec_error("ln", 0), &["num_channels must be at least 1"]);
}

#[test]
fn channel_mismatch_is_named() {
    for spec in ["bn", "gn:groups=2", "ln", "in"] {
        let e = forward_error(spec, 4, &[2, 3, 5], true);
        assert_mentions(&e, &["input has 3 channels", "built for 4", "[2, 3, 5]"]);
    }
}

#[test]
fn rank_below_two_is_refused() {
    for spec in ["bn", "gn:groups=2", "ln", "in"] {
        let e = forward_error(spec, 4, &[4], true);
        assert_mentions(&e, &["(N, C, ...)", "at least 2 dimensions", "[4]"]);
    }
}

#[test]
fn instance_norm_needs_spatial_dimensions() {
    for train in [true, false] {
        let e = forward_error("in", 4, &[8, 4], train);
        assert_mentions(
            &e,
            &["in: expected an input with spatial dimensions", "[8, 4]"],
        );
        let e = forward_error("in:track_running_stats=true", 4, &[8, 4], train);
        assert_mentions(&e, &["spatial dimensions"]);
    }
    let e = forward_error("in", 4, &[8, 4, 1], true);
    assert_mentions(&e, &["more than 1 spatial element"]);
}

#[test]
fn batch_norm_training_needs_more_than_one_value_per_channel() {
    for shape in [&[1, 4][..], &[1, 4, 1], &[1, 4, 1, 1]] {
        let e = forward_error("bn", 4, shape, true);
        assert_mentions(
            &e,
            &["expected more than 1 value per channel when training"],
        );
    }
    let (norm, _) = build("bn", 4, DType::F32);
    let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(
        norm.forward_t(&x, false).is_ok(),
        "evaluation uses the running statistics"
    );
}

#[test]
fn empty_and_integer_inputs_are_refused() {
    assert_mentions(&forward_error("ln", 4, &[0, 4, 3], true), &["is empty"]);
    let (norm, _) = build("gn:groups=2", 4, DType::F32);
    let x = Tensor::ones((2, 4, 3), DType::U32, &Device::Cpu).unwrap();
    let e = norm.forward_t(&x, true).unwrap_err().to_string();
    assert_mentions(&e, &["floating-point input", "U32"]);
}

/// Every public kernel entry point refuses operands that do not fit the input (an error, not a
/// panic or a read out of bounds).
mod kernel_operands {
    use super::assert_mentions;
    use candle_core::{DType, Device, Tensor};
    use normalizers::kernels::{
        fused_backward, fused_normalize, fused_normalize_fixed, fused_normalize_lean, Sets, Stats,
    };

    fn t(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::ones(shape, dtype, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_forwards_check_weight_and_bias() {
        let x = t(&[2, 4, 3], DType::F32);
        let (w, b) = (t(&[4], DType::F32), t(&[4], DType::F32));
        for (bad_w, bad_b, what) in [
            (t(&[3], DType::F32), b.clone(), "weight"),
            (w.clone(), t(&[5], DType::F32), "bias"),
            (t(&[4], DType::F64), b.clone(), "weight"),
            (t(&[2, 2], DType::F32), b.clone(), "weight"),
        ] {
            let e = fused_normalize(&x, &bad_w, &bad_b, Sets::Groups(2), 1e-5)
                .err()
                .unwrap()
                .to_string();
            assert_mentions(&e, &[what, "(4)"]);
            let e = fused_normalize_lean(&x, &bad_w, &bad_b, Sets::Channels, 1e-5)
                .unwrap_err()
                .to_string();
            assert_mentions(&e, &[what, "(4)"]);
            let stats = Stats {
                mean: vec![0.0; 4],
                var: vec![1.0; 4],
            };
            let e = fused_normalize_fixed(&x, &bad_w, &bad_b, stats, 1e-5)
                .unwrap_err()
                .to_string();
            assert_mentions(&e, &[what, "(4)"]);
        }
        let short = Stats {
            mean: vec![0.0; 3],
            var: vec![1.0; 4],
        };
        let e = fused_normalize_fixed(&x, &w, &b, short, 1e-5)
            .unwrap_err()
            .to_string();
        assert_mentions(&e, &["3 means", "4 sets"]);
    }

    #[test]
    fn the_backward_checks_the_output_gradient_weight_and_statistics() {
        let x = t(&[2, 4, 3], DType::F32);
        let w = t(&[4], DType::F32);
        let (_, stats) = fused_normalize(&x, &w, &w, Sets::Groups(2), 1e-5).unwrap();
        for dy in [
            t(&[2, 4, 2], DType::F32),
            t(&[1, 4, 3], DType::F32),
            t(&[2, 4, 3], DType::F64),
        ] {
            let e = fused_backward(&x, &w, &dy, Sets::Groups(2), Some(&stats), 1e-5)
                .unwrap_err()
                .to_string();
            assert_mentions(&e, &["output gradient", "[2, 4, 3]"]);
        }
        let dy = t(&[2, 4, 3], DType::F32);
        let e = fused_backward(&x, &t(&[8], DType::F32), &dy, Sets::Groups(2), None, 1e-5)
            .unwrap_err()
            .to_string();
        assert_mentions(&e, &["weight", "(4)"]);
        // Statistics of another grouping: 4 sets (2 samples x 2 groups) expected.
        let wrong = Stats {
            mean: vec![0.0; 8],
            var: vec![1.0; 8],
        };
        let e = fused_backward(&x, &w, &dy, Sets::Groups(2), Some(&wrong), 1e-5)
            .unwrap_err()
            .to_string();
        assert_mentions(&e, &["8 means", "4 sets"]);
        assert!(fused_backward(&x, &w, &dy, Sets::Groups(2), Some(&stats), 1e-5).is_ok());
    }

    #[test]
    fn the_reference_group_norm_refuses_zero_groups() {
        let x = t(&[2, 4, 3], DType::F32);
        for groups in [0, 3] {
            let e = normalizers::reference::group_norm(&x, groups, 1e-5)
                .unwrap_err()
                .to_string();
            assert_mentions(&e, &["4 channels", "groups"]);
        }
    }
}

#[test]
fn the_remedies_and_batch_free_layers_refuse_bad_specs_by_name() {
    assert_mentions(
        &spec_error("frn:groups=2", 4),
        &["unknown option \"groups\"", "frn", "tlu, eps, affine, impl"],
    );
    assert_mentions(
        &spec_error("evonorm-s0:groups=3", 4),
        &[
            "evonorm-s0",
            "groups=3 does not divide num_channels=4",
            "1, 2, 4",
        ],
    );
    assert_mentions(
        &spec_error("ghostbn:virtual=0", 4),
        &["virtual=\"0\"", "at least 1"],
    );
    assert_mentions(&spec_error("ghostbn", 4), &["ghostbn needs virtual=K"]);
    assert_mentions(
        &spec_error("brn:rmax=0.9", 4),
        &["rmax=0.9", "rmax must be >= 1"],
    );
    assert_mentions(
        &spec_error("brn:dmax=-0.1", 4),
        &["dmax=-0.1", "dmax must be >= 0"],
    );
    for spec in [
        "rms:eps=0",
        "frn:eps=-1",
        "evonorm-b0:eps=0",
        "brn:eps=0",
        "ghostbn:virtual=2,eps=0",
    ] {
        assert_mentions(&spec_error(spec, 4), &["eps must be > 0"]);
    }
    assert_mentions(
        &spec_error("rms:impl=fast", 4),
        &["impl=\"fast\"", "fused or reference"],
    );
}

#[test]
fn batch_layers_refuse_one_value_per_channel_in_training() {
    for spec in ["brn", "evonorm-b0", "ghostbn:virtual=1"] {
        let e = forward_error(spec, 3, &[1, 3], true);
        assert_mentions(&e, &["more than 1 value per channel", "[1, 3]"]);
    }
    // ghostbn: a ragged last chunk of one sample without spatial values is one value.
    let e = forward_error("ghostbn:virtual=2", 3, &[5, 3], true);
    assert_mentions(&e, &["more than 1 value per channel", "[1, 3]"]);
    for spec in ["rms", "frn", "evonorm-s0:groups=3", "brn", "evonorm-b0"] {
        let e = forward_error(spec, 3, &[2, 4, 5], true);
        assert_mentions(&e, &["input has 4 channels", "built for 3"]);
    }
}
