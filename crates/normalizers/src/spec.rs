//! Spec strings: the one name a normalizer has in configs, on command lines, in CSVs and plots.
//!
//! Grammar: `NAME` or `NAME:key=value,key=value`. Names are case-insensitive: `bn` (`batch`),
//! `gn` (`group`), `ln` (`layer`), `in` (`instance`), `none` (`identity`). [`NormSpec`]'s `Display` is the canonical
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

/// The options every normalizer has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Common {
    pub eps: f64,
    pub affine: bool,
    pub imp: Impl,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            eps: DEFAULT_EPS,
            affine: true,
            imp: Impl::Fused,
        }
    }
}

/// `bn`'s options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormConfig {
    pub momentum: Momentum,
    pub track_running_stats: bool,
    pub common: Common,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            momentum: DEFAULT_MOMENTUM,
            track_running_stats: true,
            common: Common::default(),
        }
    }
}

/// `gn`'s options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormConfig {
    pub groups: usize,
    pub common: Common,
}

impl Default for GroupNormConfig {
    fn default() -> Self {
        Self {
            groups: DEFAULT_GROUPS,
            common: Common::default(),
        }
    }
}

/// `ln`'s options.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerNormConfig {
    pub common: Common,
}

/// `in`'s options (running statistics off by default, as PyTorch's InstanceNorm).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceNormConfig {
    pub track_running_stats: bool,
    pub momentum: Momentum,
    pub common: Common,
}

impl Default for InstanceNormConfig {
    fn default() -> Self {
        Self {
            track_running_stats: false,
            momentum: DEFAULT_MOMENTUM,
            common: Common::default(),
        }
    }
}

/// `none`'s options: `eps` and `impl` are accepted, as every normalizer takes them, and change
/// nothing; it has no weight or bias (`affine` is false).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentityConfig {
    pub common: Common,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            common: Common {
                affine: false,
                ..Common::default()
            },
        }
    }
}

/// A parsed spec string: one normalizer's config. Build one with [`str::parse`], print it with
/// `Display`.
#[derive(Debug, Clone, PartialEq)]
pub enum NormSpec {
    Batch(BatchNormConfig),
    Group(GroupNormConfig),
    Layer(LayerNormConfig),
    Instance(InstanceNormConfig),
    Identity(IdentityConfig),
}

pub const DEFAULT_EPS: f64 = 1e-5;
pub const DEFAULT_MOMENTUM: Momentum = Momentum::Exponential(0.1);
pub const DEFAULT_GROUPS: usize = 32;

const NAMES: &str = "bn (batch), gn (group), ln (layer), in (instance), none (identity)";

/// Each normalizer's short name, long alias and options, in canonical order: what parsing
/// accepts, what `Display` prints (where an option differs from its default) and what error
/// messages list.
const KEYS: [(&str, &str, &[&str]); 5] = [
    (
        "bn",
        "batch",
        &["momentum", "eps", "affine", "track_running_stats", "impl"],
    ),
    ("gn", "group", &["groups", "eps", "affine", "impl"]),
    ("ln", "layer", &["eps", "affine", "impl"]),
    (
        "in",
        "instance",
        &["eps", "affine", "track_running_stats", "momentum", "impl"],
    ),
    ("none", "identity", &["eps", "impl"]),
];

impl NormSpec {
    pub fn batch() -> Self {
        NormSpec::Batch(BatchNormConfig::default())
    }

    pub fn group(groups: usize) -> Self {
        NormSpec::Group(GroupNormConfig {
            groups,
            ..Default::default()
        })
    }

    pub fn layer() -> Self {
        NormSpec::Layer(LayerNormConfig::default())
    }

    pub fn instance() -> Self {
        NormSpec::Instance(InstanceNormConfig::default())
    }

    /// The default spec of the normalizer called `name` (short or long, any case).
    fn named(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let (short, _, _) = KEYS.iter().find(|(s, l, _)| *s == name || *l == name)?;
        Some(match *short {
            "bn" => NormSpec::batch(),
            "gn" => NormSpec::group(DEFAULT_GROUPS),
            "ln" => NormSpec::layer(),
            "in" => NormSpec::instance(),
            _ => NormSpec::Identity(IdentityConfig::default()),
        })
    }

    /// The canonical short name: `bn`, `gn`, `ln`, `in` or `none`.
    pub fn name(&self) -> &'static str {
        match self {
            NormSpec::Batch(_) => "bn",
            NormSpec::Group(_) => "gn",
            NormSpec::Layer(_) => "ln",
            NormSpec::Instance(_) => "in",
            NormSpec::Identity(_) => "none",
        }
    }

    fn keys(&self) -> &'static [&'static str] {
        KEYS.iter()
            .find(|(s, _, _)| *s == self.name())
            .map_or(&[], |(_, _, keys)| keys)
    }

    /// The options every normalizer shares.
    pub fn common(&self) -> &Common {
        match self {
            NormSpec::Batch(c) => &c.common,
            NormSpec::Group(c) => &c.common,
            NormSpec::Layer(c) => &c.common,
            NormSpec::Instance(c) => &c.common,
            NormSpec::Identity(c) => &c.common,
        }
    }

    fn common_mut(&mut self) -> &mut Common {
        match self {
            NormSpec::Batch(c) => &mut c.common,
            NormSpec::Group(c) => &mut c.common,
            NormSpec::Layer(c) => &mut c.common,
            NormSpec::Instance(c) => &mut c.common,
            NormSpec::Identity(c) => &mut c.common,
        }
    }

    pub fn eps(&self) -> f64 {
        self.common().eps
    }

    pub fn affine(&self) -> bool {
        self.common().affine
    }

    pub fn imp(&self) -> Impl {
        self.common().imp
    }

    /// Whether the output of one sample depends on the other samples of the batch in training.
    pub fn uses_batch_statistics(&self) -> bool {
        matches!(self, NormSpec::Batch(_))
    }

    /// The value of option `key` (one of [`KEYS`]'), as it prints.
    fn get(&self, key: &str) -> String {
        let c = self.common();
        match (self, key) {
            (_, "eps") => format!("{:e}", c.eps),
            (_, "affine") => c.affine.to_string(),
            (_, "impl") => c.imp.to_string(),
            (NormSpec::Batch(b), "momentum") => b.momentum.to_string(),
            (NormSpec::Instance(i), "momentum") => i.momentum.to_string(),
            (NormSpec::Batch(b), "track_running_stats") => b.track_running_stats.to_string(),
            (NormSpec::Instance(i), "track_running_stats") => i.track_running_stats.to_string(),
            (NormSpec::Group(g), "groups") => g.groups.to_string(),
            _ => String::new(),
        }
    }

    /// The options that differ from the normalizer's defaults, in canonical order.
    fn options(&self) -> Vec<(&'static str, String)> {
        let default = NormSpec::named(self.name()).unwrap_or_else(NormSpec::layer);
        self.keys()
            .iter()
            .map(|&key| (key, self.get(key)))
            .filter(|(key, value)| *value != default.get(key))
            .collect()
    }

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if !self.keys().contains(&key) {
            bail!(
                "unknown option \"{key}\" for normalizer {}; valid options are {}",
                self.name(),
                self.keys().join(", ")
            );
        }
        match (self, key) {
            (s, "eps") => s.common_mut().eps = parse_eps(value)?,
            (s, "affine") => s.common_mut().affine = parse_bool(key, value)?,
            (s, "impl") => s.common_mut().imp = parse_impl(value)?,
            (NormSpec::Batch(b), "momentum") => b.momentum = parse_momentum(value, true)?,
            (NormSpec::Instance(i), "momentum") => i.momentum = parse_momentum(value, false)?,
            (NormSpec::Batch(b), "track_running_stats") => {
                b.track_running_stats = parse_bool(key, value)?
            }
            (NormSpec::Instance(i), "track_running_stats") => {
                i.track_running_stats = parse_bool(key, value)?
            }
            (NormSpec::Group(g), "groups") => g.groups = parse_groups(value)?,
            (s, key) => bail!("option \"{key}\" of {} has no setter", s.name()),
        }
        Ok(())
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
        if name.is_empty() {
            bail!("empty normalizer spec; expected one of {NAMES}");
        }
        let Some(mut spec) = NormSpec::named(name) else {
            bail!("unknown normalizer \"{name}\" in spec \"{s}\"; expected one of {NAMES}");
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
    fn every_key_in_the_table_parses_and_prints() {
        for (name, long, keys) in KEYS {
            for &key in keys {
                let value = match (name, key) {
                    (_, "eps") => "0.001",
                    (_, "affine") => "false",
                    (_, "impl") => "reference",
                    (_, "momentum") => "0.5",
                    ("bn", "track_running_stats") => "false",
                    (_, "track_running_stats") => "true",
                    (_, "groups") => "4",
                    _ => panic!("no test value for {name}:{key}"),
                };
                let spec: NormSpec = format!("{long}:{key}={value}").parse().unwrap();
                let text = spec.to_string();
                assert!(text.starts_with(&format!("{name}:{key}=")), "{text}");
                assert_eq!(text.parse::<NormSpec>().unwrap(), spec);
            }
        }
    }

    #[test]
    fn options_parse_and_print_canonically() {
        let spec: NormSpec = " bn : eps=1e-3 , momentum=None,affine=false "
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            NormSpec::Batch(BatchNormConfig {
                momentum: Momentum::Cumulative,
                track_running_stats: true,
                common: Common {
                    eps: 1e-3,
                    affine: false,
                    imp: Impl::Fused,
                },
            })
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
