//! Parsing of option values, each error naming the option and what it accepts.

use super::{Impl, Momentum};
use candle_core::{bail, Result};

pub fn parse_impl(value: &str) -> Result<Impl> {
    match value.to_ascii_lowercase().as_str() {
        "fused" => Ok(Impl::Fused),
        "reference" => Ok(Impl::Reference),
        _ => bail!("option impl={value:?} is not an implementation; use fused or reference"),
    }
}

pub fn parse_f64(key: &str, value: &str) -> Result<f64> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => bail!("option {key}={value:?} is not a finite number"),
    }
}

pub fn parse_eps(value: &str) -> Result<f64> {
    let eps = parse_f64("eps", value)?;
    if eps <= 0.0 {
        bail!("option eps={value} is out of range: eps must be > 0 (the default is 1e-5)");
    }
    Ok(eps)
}

pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("option {key}={value:?} is not a boolean; use true or false"),
    }
}

/// A momentum in [0, 1], or `none` (a cumulative average) where `cumulative` names no reason
/// to refuse it.
pub fn parse_momentum(value: &str, name: &str, cumulative: Option<&str>) -> Result<Momentum> {
    if value.eq_ignore_ascii_case("none") {
        match cumulative {
            None => return Ok(Momentum::Cumulative),
            Some(why) => bail!(
                "option momentum=none is not supported for {name}: {why}. Use a number in [0, 1]"
            ),
        }
    }
    let m = parse_f64("momentum", value).map_err(|_| {
        candle_core::Error::Msg(format!(
            "option momentum={value:?} is not a number in [0, 1] or none"
        ))
    })?;
    if !(0.0..=1.0).contains(&m) {
        bail!("option momentum={value} is out of range: use a number in [0, 1] or none");
    }
    Ok(Momentum::Exponential(m))
}

/// A whole number ≥ `min`.
pub fn parse_count(key: &str, value: &str, min: usize) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(g) if g >= min => Ok(g),
        _ if min == 0 => bail!("option {key}={value:?} is not a whole number (0 or more)"),
        _ if min == 1 => bail!("option {key}={value:?} is not a positive whole number"),
        _ => bail!("option {key}={value:?} is not a whole number of at least {min}"),
    }
}

/// A finite number ≥ `min`, `why` saying what the bound means.
pub fn parse_at_least(key: &str, value: &str, min: f64, why: &str) -> Result<f64> {
    let v = parse_f64(key, value)?;
    if v < min {
        bail!("option {key}={value} is out of range: {why}");
    }
    Ok(v)
}
