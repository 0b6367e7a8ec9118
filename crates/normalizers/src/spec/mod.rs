//! Spec strings: the one name a normalizer has in configs, on command lines, in CSVs and plots.
//!
//! Grammar: `NAME` or `NAME:key=value,key=value`. Names are case-insensitive: `bn` (`batch`),
//! `gn` (`group`), `ln` (`layer`), `in` (`instance`), `none` (`identity`), `rms` (`rmsnorm`),
//! `frn` (`filter_response`), `evonorm-s0` (`evonorm_s0`), `evonorm-b0` (`evonorm_b0`), `brn`
//! (`batch_renorm`), `ghostbn` (`ghost_batch`). [`NormSpec`]'s `Display` is the canonical
//! form: the short name followed by the options that differ from their defaults, in a fixed order,
//! so that `spec.to_string().parse::<NormSpec>() == Ok(spec)`.

mod configs;
mod values;

pub use configs::*;

use candle_core::{bail, Result};
use std::fmt;
use std::str::FromStr;
use values::*;

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

/// A parsed spec string: one normalizer's config. Build one with [`str::parse`], print it with
/// `Display`.
#[derive(Debug, Clone, PartialEq)]
pub enum NormSpec {
    Batch(BatchNormConfig),
    Group(GroupNormConfig),
    Layer(LayerNormConfig),
    Instance(InstanceNormConfig),
    Identity(IdentityConfig),
    Rms(RmsNormConfig),
    Frn(FrnConfig),
    EvoNormS0(EvoNormS0Config),
    EvoNormB0(EvoNormB0Config),
    BatchRenorm(BatchRenormConfig),
    GhostBatch(GhostBatchNormConfig),
}

pub const DEFAULT_EPS: f64 = 1e-5;
pub const DEFAULT_MOMENTUM: Momentum = Momentum::Exponential(0.1);
pub const DEFAULT_GROUPS: usize = 32;

const NAMES: &str = "bn (batch), gn (group), ln (layer), in (instance), none (identity), \
                     rms (rmsnorm), frn (filter_response), evonorm-s0, evonorm-b0, brn \
                     (batch_renorm), ghostbn (ghost_batch)";

/// Each normalizer's short name, long alias and options, in canonical order: what parsing
/// accepts, what `Display` prints (where an option differs from its default) and what error
/// messages list.
const KEYS: [(&str, &str, &[&str]); 11] = [
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
    ("rms", "rmsnorm", &["eps", "affine", "impl"]),
    ("frn", "filter_response", &["tlu", "eps", "affine", "impl"]),
    (
        "evonorm-s0",
        "evonorm_s0",
        &["groups", "eps", "affine", "impl"],
    ),
    (
        "evonorm-b0",
        "evonorm_b0",
        &["momentum", "eps", "affine", "impl"],
    ),
    (
        "brn",
        "batch_renorm",
        &[
            "rmax", "dmax", "warmup", "momentum", "eps", "affine", "impl",
        ],
    ),
    (
        "ghostbn",
        "ghost_batch",
        &[
            "virtual",
            "momentum",
            "eps",
            "affine",
            "track_running_stats",
            "impl",
        ],
    ),
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
            "rms" => NormSpec::Rms(RmsNormConfig::default()),
            "frn" => NormSpec::Frn(FrnConfig::default()),
            "evonorm-s0" => NormSpec::EvoNormS0(EvoNormS0Config::default()),
            "evonorm-b0" => NormSpec::EvoNormB0(EvoNormB0Config::default()),
            "brn" => NormSpec::BatchRenorm(BatchRenormConfig::default()),
            "ghostbn" => NormSpec::GhostBatch(GhostBatchNormConfig::default()),
            _ => NormSpec::Identity(IdentityConfig::default()),
        })
    }

    /// The canonical short name: `bn`, `gn`, `ln`, `in`, `none`, `rms`, `frn`, `evonorm-s0`,
    /// `evonorm-b0`, `brn` or `ghostbn`.
    pub fn name(&self) -> &'static str {
        match self {
            NormSpec::Batch(_) => "bn",
            NormSpec::Group(_) => "gn",
            NormSpec::Layer(_) => "ln",
            NormSpec::Instance(_) => "in",
            NormSpec::Identity(_) => "none",
            NormSpec::Rms(_) => "rms",
            NormSpec::Frn(_) => "frn",
            NormSpec::EvoNormS0(_) => "evonorm-s0",
            NormSpec::EvoNormB0(_) => "evonorm-b0",
            NormSpec::BatchRenorm(_) => "brn",
            NormSpec::GhostBatch(_) => "ghostbn",
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
            NormSpec::Rms(c) => &c.common,
            NormSpec::Frn(c) => &c.common,
            NormSpec::EvoNormS0(c) => &c.common,
            NormSpec::EvoNormB0(c) => &c.common,
            NormSpec::BatchRenorm(c) => &c.common,
            NormSpec::GhostBatch(c) => &c.bn.common,
        }
    }

    fn common_mut(&mut self) -> &mut Common {
        match self {
            NormSpec::Batch(c) => &mut c.common,
            NormSpec::Group(c) => &mut c.common,
            NormSpec::Layer(c) => &mut c.common,
            NormSpec::Instance(c) => &mut c.common,
            NormSpec::Identity(c) => &mut c.common,
            NormSpec::Rms(c) => &mut c.common,
            NormSpec::Frn(c) => &mut c.common,
            NormSpec::EvoNormS0(c) => &mut c.common,
            NormSpec::EvoNormB0(c) => &mut c.common,
            NormSpec::BatchRenorm(c) => &mut c.common,
            NormSpec::GhostBatch(c) => &mut c.bn.common,
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
        matches!(
            self,
            NormSpec::Batch(_)
                | NormSpec::BatchRenorm(_)
                | NormSpec::GhostBatch(_)
                | NormSpec::EvoNormB0(_)
        )
    }

    /// Whether the layer brings its own nonlinearity and replaces normalizer + ReLU, as timm's
    /// norm-act layers do: `frn` with its TLU, `evonorm-s0` (x·σ(v·x)) and `evonorm-b0`
    /// (x / max(…, v·x + …)). A model puts no ReLU after such a layer.
    pub fn is_norm_activation(&self) -> bool {
        match self {
            NormSpec::Frn(c) => c.tlu,
            NormSpec::EvoNormS0(_) | NormSpec::EvoNormB0(_) => true,
            _ => false,
        }
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
            (NormSpec::EvoNormB0(e), "momentum") => e.momentum.to_string(),
            (NormSpec::BatchRenorm(r), "momentum") => r.momentum.to_string(),
            (NormSpec::GhostBatch(g), "momentum") => g.bn.momentum.to_string(),
            (NormSpec::Batch(b), "track_running_stats") => b.track_running_stats.to_string(),
            (NormSpec::Instance(i), "track_running_stats") => i.track_running_stats.to_string(),
            (NormSpec::GhostBatch(g), "track_running_stats") => {
                g.bn.track_running_stats.to_string()
            }
            (NormSpec::Group(g), "groups") => g.groups.to_string(),
            (NormSpec::EvoNormS0(e), "groups") => e.groups.to_string(),
            (NormSpec::Frn(f), "tlu") => f.tlu.to_string(),
            (NormSpec::BatchRenorm(r), "rmax") => r.rmax.to_string(),
            (NormSpec::BatchRenorm(r), "dmax") => r.dmax.to_string(),
            (NormSpec::BatchRenorm(r), "warmup") => r.warmup.to_string(),
            (NormSpec::GhostBatch(g), "virtual") => g.virtual_size.to_string(),
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
        const COUNTED: &str = "brn's num_batches_tracked counts its training steps";
        match (self, key) {
            (s, "eps") => s.common_mut().eps = parse_eps(value)?,
            (s, "affine") => s.common_mut().affine = parse_bool(key, value)?,
            (s, "impl") => s.common_mut().imp = parse_impl(value)?,
            (NormSpec::Batch(b), "momentum") => b.momentum = parse_momentum(value, "bn", None)?,
            (NormSpec::Instance(i), "momentum") => i.momentum = parse_momentum(
                value,
                "in",
                Some(
                    "PyTorch's InstanceNorm silently stops updating its running statistics with it",
                ),
            )?,
            (NormSpec::EvoNormB0(e), "momentum") => {
                e.momentum = parse_momentum(value, "evonorm-b0", None)?
            }
            (NormSpec::GhostBatch(g), "momentum") => {
                g.bn.momentum = parse_momentum(value, "ghostbn", None)?
            }
            (NormSpec::BatchRenorm(r), "momentum") => {
                r.momentum = match parse_momentum(value, "brn", Some(COUNTED))? {
                    Momentum::Exponential(m) => m,
                    Momentum::Cumulative => unreachable!("refused above"),
                }
            }
            (NormSpec::Batch(b), "track_running_stats") => {
                b.track_running_stats = parse_bool(key, value)?
            }
            (NormSpec::Instance(i), "track_running_stats") => {
                i.track_running_stats = parse_bool(key, value)?
            }
            (NormSpec::GhostBatch(g), "track_running_stats") => {
                g.bn.track_running_stats = parse_bool(key, value)?
            }
            (NormSpec::Group(g), "groups") => g.groups = parse_count(key, value, 1)?,
            (NormSpec::EvoNormS0(e), "groups") => e.groups = parse_count(key, value, 1)?,
            (NormSpec::Frn(f), "tlu") => f.tlu = parse_bool(key, value)?,
            (NormSpec::BatchRenorm(r), "rmax") => {
                r.rmax = parse_at_least(key, value, 1.0, "rmax must be >= 1 (1 clips r to 1)")?
            }
            (NormSpec::BatchRenorm(r), "dmax") => {
                r.dmax = parse_at_least(key, value, 0.0, "dmax must be >= 0 (0 clips d to 0)")?
            }
            (NormSpec::BatchRenorm(r), "warmup") => r.warmup = parse_count(key, value, 0)?,
            (NormSpec::GhostBatch(g), "virtual") => {
                g.virtual_size = parse_count(key, value, 1).map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "option virtual={value:?} is not a virtual batch size: use a whole \
                         number of at least 1 (e.g. ghostbn:virtual=2)"
                    ))
                })?
            }
            (s, key) => bail!("option \"{key}\" of {} has no setter", s.name()),
        }
        Ok(())
    }

    /// Refuses a spec that lacks a required option.
    fn check_complete(&self, s: &str) -> Result<()> {
        if let NormSpec::GhostBatch(g) = self {
            if g.virtual_size == 0 {
                bail!(
                    "spec \"{s}\" lacks the virtual batch size: ghostbn needs virtual=K, the \
                     number of samples each ghost batch normalizes (e.g. ghostbn:virtual=2)"
                );
            }
        }
        Ok(())
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
        let mut seen = Vec::new();
        for option in options.into_iter().flat_map(|o| o.split(',')) {
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
        spec.check_complete(s)?;
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
                    ("in", "track_running_stats") => "true",
                    (_, "track_running_stats") => "false",
                    (_, "groups") => "4",
                    (_, "tlu") => "false",
                    (_, "rmax") => "2",
                    (_, "dmax") => "0.5",
                    (_, "warmup") => "100",
                    (_, "virtual") => "4",
                    _ => panic!("no test value for {name}:{key}"),
                };
                let extra = if name == "ghostbn" && key != "virtual" {
                    ",virtual=2"
                } else {
                    ""
                };
                let spec: NormSpec = format!("{long}:{key}={value}{extra}").parse().unwrap();
                let text = spec.to_string();
                assert!(text.contains(&format!("{key}=")), "{text}");
                assert!(text.starts_with(&format!("{name}:")), "{text}");
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

#[cfg(test)]
mod new_layer_tests {
    use super::*;

    #[test]
    fn the_new_layers_parse_with_their_defaults_and_refuse_bad_options() {
        for (input, canonical) in [
            ("RMSNORM", "rms"),
            ("frn:eps=1e-6,tlu=true", "frn"),
            ("frn:tlu=false", "frn:tlu=false"),
            ("evonorm_s0:groups=8", "evonorm-s0:groups=8"),
            ("evonorm-b0:momentum=0.1", "evonorm-b0"),
            ("batch_renorm:rmax=3,dmax=5,warmup=0", "brn"),
            ("ghostbn:virtual=2", "ghostbn:virtual=2"),
            (
                "ghost_batch:momentum=none,virtual=4",
                "ghostbn:virtual=4,momentum=none",
            ),
        ] {
            assert_eq!(input.parse::<NormSpec>().unwrap().to_string(), canonical);
        }
        assert_eq!("frn".parse::<NormSpec>().unwrap().eps(), 1e-6);
        for (bad, needle) in [
            ("ghostbn", "virtual=K"),
            ("ghostbn:virtual=0", "at least 1"),
            ("evonorm-s0:groups=0", "positive whole number"),
            ("brn:rmax=0.5", "rmax must be >= 1"),
            ("brn:dmax=-1", "dmax must be >= 0"),
            ("brn:momentum=none", "num_batches_tracked"),
            ("brn:warmup=1.5", "whole number"),
            ("frn:eps=0", "eps must be > 0"),
            ("rms:groups=2", "valid options are eps, affine, impl"),
            ("frn:tlu=maybe", "not a boolean"),
        ] {
            let e = bad.parse::<NormSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        for batchy in ["bn", "brn", "ghostbn:virtual=2", "evonorm-b0"] {
            assert!(batchy.parse::<NormSpec>().unwrap().uses_batch_statistics());
        }
        for free in ["gn", "rms", "frn", "evonorm-s0", "none"] {
            assert!(!free.parse::<NormSpec>().unwrap().uses_batch_statistics());
        }
    }
}
