//! Spec strings: the one name a normalizer has in configs, on command lines, in CSVs and plots.
//!
//! Grammar: `NAME` or `NAME:key=value,key=value`. Names are case-insensitive: `bn` (`batch`),
//! `gn` (`group`), `ln` (`layer`), `in` (`instance`). [`NormSpec`]'s `Display` is the canonical
//! form: the short name followed by the options that differ from their defaults, in a fixed order,
//! so that `spec.to_string().parse::<NormSpec>() == Ok(spec)`.

use candle_core::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// Weight of the new batch in a running-statistics update (PyTorch's `momentum`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// `running = (1 - m) * running + m * batch`.
    Exponential(f64),
    /// PyTorch's `momentum=None`: the running statistics are the plain average of every batch seen.
    Cumulative,
}

impl fmt::Display for Momentum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Momentum::Exponential(m) => write!(f, "{m}"),
            Momentum::Cumulative => f.write_str("none"),
        }
    }
}

/// Which implementation computes a normalizer's training forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Impl {
    /// The fused CPU kernels (`kernels/`); the reference ops on devices without them.
    #[default]
    Fused,
    /// The composite reference ops (`reference.rs`), differentiated by candle's autograd.
    Reference,
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Fused => "fused",
            Impl::Reference => "reference",
        })
    }
}

/// A parsed spec string. Build one with [`str::parse`], print it with `Display`.
#[derive(Debug, Clone, PartialEq)]
pub enum NormSpec {
    Batch {
        momentum: Momentum,
        eps: f64,
        affine: bool,
        track_running_stats: bool,
        imp: Impl,
    },
    Group {
        groups: usize,
        eps: f64,
        affine: bool,
        imp: Impl,
    },
    Layer {
        eps: f64,
        affine: bool,
        imp: Impl,
    },
    Instance {
        eps: f64,
        affine: bool,
        track_running_stats: bool,
        momentum: Momentum,
        imp: Impl,
    },
}

pub const DEFAULT_EPS: f64 = 1e-5;
pub const DEFAULT_MOMENTUM: Momentum = Momentum::Exponential(0.1);
pub const DEFAULT_GROUPS: usize = 32;

const NAMES: &str = "bn (batch), gn (group), ln (layer), in (instance)";

impl NormSpec {
    pub fn batch() -> Self {
        NormSpec::Batch {
            momentum: DEFAULT_MOMENTUM,
            eps: DEFAULT_EPS,
            affine: true,
            track_running_stats: true,
            imp: Impl::Fused,
        }
    }

    pub fn group(groups: usize) -> Self {
        NormSpec::Group {
            groups,
            eps: DEFAULT_EPS,
            affine: true,
            imp: Impl::Fused,
        }
    }

    pub fn layer() -> Self {
        NormSpec::Layer {
            eps: DEFAULT_EPS,
            affine: true,
            imp: Impl::Fused,
        }
    }

    pub fn instance() -> Self {
        NormSpec::Instance {
            eps: DEFAULT_EPS,
            affine: true,
            track_running_stats: false,
            momentum: DEFAULT_MOMENTUM,
            imp: Impl::Fused,
        }
    }

    /// The canonical short name: `bn`, `gn`, `ln` or `in`.
    pub fn name(&self) -> &'static str {
        match self {
            NormSpec::Batch { .. } => "bn",
            NormSpec::Group { .. } => "gn",
            NormSpec::Layer { .. } => "ln",
            NormSpec::Instance { .. } => "in",
        }
    }

    pub fn eps(&self) -> f64 {
        match self {
            NormSpec::Batch { eps, .. }
            | NormSpec::Group { eps, .. }
            | NormSpec::Layer { eps, .. }
            | NormSpec::Instance { eps, .. } => *eps,
        }
    }

    pub fn affine(&self) -> bool {
        match self {
            NormSpec::Batch { affine, .. }
            | NormSpec::Group { affine, .. }
            | NormSpec::Layer { affine, .. }
            | NormSpec::Instance { affine, .. } => *affine,
        }
    }

    pub fn imp(&self) -> Impl {
        match self {
            NormSpec::Batch { imp, .. }
            | NormSpec::Group { imp, .. }
            | NormSpec::Layer { imp, .. }
            | NormSpec::Instance { imp, .. } => *imp,
        }
    }

    /// Whether the output of one sample depends on the other samples of the batch in training.
    pub fn uses_batch_statistics(&self) -> bool {
        matches!(self, NormSpec::Batch { .. })
    }

    fn options(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let default_eps = |eps: f64, out: &mut Vec<_>| {
            if eps != DEFAULT_EPS {
                out.push(("eps", format!("{eps:e}")));
            }
        };
        match *self {
            NormSpec::Batch {
                momentum,
                eps,
                affine,
                track_running_stats,
                ..
            } => {
                if momentum != DEFAULT_MOMENTUM {
                    out.push(("momentum", momentum.to_string()));
                }
                default_eps(eps, &mut out);
                if !affine {
                    out.push(("affine", "false".into()));
                }
                if !track_running_stats {
                    out.push(("track_running_stats", "false".into()));
                }
            }
            NormSpec::Group {
                groups,
                eps,
                affine,
                ..
            } => {
                if groups != DEFAULT_GROUPS {
                    out.push(("groups", groups.to_string()));
                }
                default_eps(eps, &mut out);
                if !affine {
                    out.push(("affine", "false".into()));
                }
            }
            NormSpec::Layer { eps, affine, .. } => {
                default_eps(eps, &mut out);
                if !affine {
                    out.push(("affine", "false".into()));
                }
            }
            NormSpec::Instance {
                eps,
                affine,
                track_running_stats,
                momentum,
                ..
            } => {
                default_eps(eps, &mut out);
                if !affine {
                    out.push(("affine", "false".into()));
                }
                if track_running_stats {
                    out.push(("track_running_stats", "true".into()));
                }
                if momentum != DEFAULT_MOMENTUM {
                    out.push(("momentum", momentum.to_string()));
                }
            }
        }
        if self.imp() != Impl::Fused {
            out.push(("impl", self.imp().to_string()));
        }
        out
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let name = self.name();
        match (self, key) {
            (
                NormSpec::Batch { eps, .. }
                | NormSpec::Group { eps, .. }
                | NormSpec::Layer { eps, .. }
                | NormSpec::Instance { eps, .. },
                "eps",
            ) => *eps = parse_eps(value)?,
            (
                NormSpec::Batch { affine, .. }
                | NormSpec::Group { affine, .. }
                | NormSpec::Layer { affine, .. }
                | NormSpec::Instance { affine, .. },
                "affine",
            ) => *affine = parse_bool(key, value)?,
            (
                NormSpec::Batch {
                    track_running_stats,
                    ..
                }
                | NormSpec::Instance {
                    track_running_stats,
                    ..
                },
                "track_running_stats",
            ) => *track_running_stats = parse_bool(key, value)?,
            (NormSpec::Batch { momentum, .. }, "momentum") => {
                *momentum = parse_momentum(value, true)?
            }
            (NormSpec::Instance { momentum, .. }, "momentum") => {
                *momentum = parse_momentum(value, false)?
            }
            (NormSpec::Group { groups, .. }, "groups") => *groups = parse_groups(value)?,
            (
                NormSpec::Batch { imp, .. }
                | NormSpec::Group { imp, .. }
                | NormSpec::Layer { imp, .. }
                | NormSpec::Instance { imp, .. },
                "impl",
            ) => *imp = parse_impl(value)?,
            (_, key) => bail!(
                "unknown option \"{key}\" for normalizer {name}; valid options are {}",
                valid_keys(name)
            ),
        }
        Ok(())
    }
}

fn valid_keys(name: &str) -> &'static str {
    match name {
        "bn" => "momentum, eps, affine, track_running_stats, impl",
        "gn" => "groups, eps, affine, impl",
        "ln" => "eps, affine, impl",
        _ => "eps, affine, track_running_stats, momentum, impl",
    }
}

fn parse_impl(value: &str) -> Result<Impl> {
    match value.to_ascii_lowercase().as_str() {
        "fused" => Ok(Impl::Fused),
        "reference" => Ok(Impl::Reference),
        _ => bail!("option impl={value:?} is not an implementation; use fused or reference"),
    }
}

fn parse_f64(key: &str, value: &str) -> Result<f64> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => bail!("option {key}={value:?} is not a finite number"),
    }
}

fn parse_eps(value: &str) -> Result<f64> {
    let eps = parse_f64("eps", value)?;
    if eps <= 0.0 {
        bail!("option eps={value} is out of range: eps must be > 0 (the default is 1e-5)");
    }
    Ok(eps)
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("option {key}={value:?} is not a boolean; use true or false"),
    }
}

fn parse_momentum(value: &str, allow_cumulative: bool) -> Result<Momentum> {
    if value.eq_ignore_ascii_case("none") {
        if allow_cumulative {
            return Ok(Momentum::Cumulative);
        }
        bail!(
            "option momentum=none is only supported for bn; PyTorch's InstanceNorm silently \
             stops updating its running statistics with it. Use a number in [0, 1]"
        );
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

fn parse_groups(value: &str) -> Result<usize> {
    match value.parse::<usize>() {
        Ok(g) if g > 0 => Ok(g),
        _ => bail!("option groups={value:?} is not a positive whole number"),
    }
}

impl FromStr for NormSpec {
    type Err = candle_core::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (name, options) = match s.split_once(':') {
            Some((name, options)) => (name.trim(), Some(options)),
            None => (s, None),
        };
        let mut spec = match name.to_ascii_lowercase().as_str() {
            "bn" | "batch" => NormSpec::batch(),
            "gn" | "group" => NormSpec::group(DEFAULT_GROUPS),
            "ln" | "layer" => NormSpec::layer(),
            "in" | "instance" => NormSpec::instance(),
            "" => bail!("empty normalizer spec; expected one of {NAMES}"),
            _ => bail!("unknown normalizer \"{name}\" in spec \"{s}\"; expected one of {NAMES}"),
        };
        let Some(options) = options else {
            return Ok(spec);
        };
        let mut seen = Vec::new();
        for option in options.split(',') {
            let Some((key, value)) = option.split_once('=') else {
                bail!(
                    "malformed option \"{}\" in spec \"{s}\"; write options as key=value, \
                     separated by commas (e.g. gn:groups=16,eps=1e-5)",
                    option.trim()
                );
            };
            let key = key.trim().to_ascii_lowercase();
            if seen.contains(&key) {
                bail!("option {key} is given twice in spec \"{s}\"");
            }
            spec.set(&key, value.trim())?;
            seen.push(key);
        }
        Ok(spec)
    }
}

impl fmt::Display for NormSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        for (i, (key, value)) in self.options().iter().enumerate() {
            let sep = if i == 0 { ':' } else { ',' };
            write!(f, "{sep}{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_print_as_bare_names() {
        for (input, canonical) in [
            ("bn", "bn"),
            ("batch", "bn"),
            ("GN", "gn"),
            ("group:groups=32", "gn"),
            ("layer", "ln"),
            ("instance:track_running_stats=false", "in"),
        ] {
            assert_eq!(input.parse::<NormSpec>().unwrap().to_string(), canonical);
        }
    }

    #[test]
    fn options_parse_and_print_canonically() {
        let spec: NormSpec = " bn : eps=1e-3 , momentum=None,affine=false "
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            NormSpec::Batch {
                momentum: Momentum::Cumulative,
                eps: 1e-3,
                affine: false,
                track_running_stats: true,
                imp: Impl::Fused,
            }
        );
        assert_eq!(spec.to_string(), "bn:momentum=none,eps=1e-3,affine=false");
        let gn: NormSpec = "gn:groups=4,eps=0.00002".parse().unwrap();
        assert_eq!(gn.to_string(), "gn:groups=4,eps=2e-5");
        assert_eq!(gn.to_string().parse::<NormSpec>().unwrap(), gn);
        let reference: NormSpec = "ln:impl=reference".parse().unwrap();
        assert_eq!(reference.imp(), Impl::Reference);
        assert_eq!(reference.to_string(), "ln:impl=reference");
    }
}
