//! The model's spec (`--model resnet:…`), its convolutions and its block plan: what the sweep,
//! the memory check and the benches need to know about the model before building it.

use anyhow::{bail, ensure, Context, Result};
use std::fmt;
use std::str::FromStr;

/// `resnet:width=W,blocks=B,stages=N,groups=G,stem=S,dropout=P,init-gain=K,ws=true|false`: N
/// stages (3 by default) of widths W, 2W, 4W, … with B blocks each; G is the group count the
/// sweep gives GroupNorm by default (it must divide W); S the stem's stride; P the dropout probability before the classifier; K a
/// multiplier on the initial convolution and classifier weights; `ws` Weight Standardization of
/// every convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    pub width: usize,
    pub blocks: usize,
    /// Stages of blocks, each after the first at half the resolution and twice the width.
    pub stages: usize,
    pub groups: usize,
    /// The stem convolution's stride: 2 halves the resolution before the first stage, as
    /// ResNet-50's stem quarters it.
    pub stem: usize,
    /// Probability of zeroing each pooled feature in training (inverted dropout), 0 ≤ p < 1.
    pub dropout: f64,
    /// Multiplies the initial convolution weights and classifier weight (> 0).
    pub init_gain: f64,
    /// Weight Standardization (Qiao et al. 2019) of every convolution's weight.
    pub ws: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            width: 16,
            blocks: 1,
            stages: 3,
            groups: 8,
            stem: 1,
            dropout: 0.0,
            init_gain: 1.0,
            ws: false,
        }
    }
}

const MODEL_KEYS: &str = "width, blocks, stages, groups, stem, dropout, init-gain, ws";

/// A `--model` option's value as a number in `range`; names the key and the range otherwise.
fn model_number(
    key: &str,
    text: &str,
    range: impl std::ops::RangeBounds<f64>,
    says: &str,
) -> Result<f64> {
    let v: f64 = text
        .parse()
        .with_context(|| format!("--model option {key}={text:?} is not a number"))?;
    ensure!(
        v.is_finite() && range.contains(&v),
        "--model option {key}={text} is out of range; {key} must be {says}"
    );
    Ok(v)
}

impl ModelConfig {
    /// Sets option `key` from `text`.
    pub fn set(&mut self, key: &str, text: &str) -> Result<()> {
        let whole = || -> Result<usize> {
            match text.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("--model option {key}={text} is not a positive whole number"),
            }
        };
        match key {
            "width" => self.width = whole()?,
            "blocks" => self.blocks = whole()?,
            "stages" => {
                self.stages = whole()?;
                ensure!(
                    self.stages <= 5,
                    "--model option stages={text} is out of range; use 1 to 5"
                );
            }
            "groups" => self.groups = whole()?,
            "stem" => {
                self.stem = whole()?;
                ensure!(
                    self.stem <= 2,
                    "--model option stem={text}: the stem's stride must be 1 or 2"
                );
            }
            "dropout" => self.dropout = model_number(key, text, 0.0..1.0, "in [0, 1)")?,
            "init-gain" => {
                self.init_gain = model_number(key, text, f64::MIN_POSITIVE.., "a number > 0")?
            }
            "ws" => {
                self.ws = match text {
                    "true" => true,
                    "false" => false,
                    _ => bail!("--model option ws={text:?} is not a boolean; use true or false"),
                }
            }
            _ => bail!("unknown --model option {key:?}; resnet takes {MODEL_KEYS}"),
        }
        Ok(())
    }
}

impl FromStr for ModelConfig {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, opts) = s.split_once(':').unwrap_or((s, ""));
        ensure!(
            name == "resnet",
            "unknown model {name:?}; expected resnet[:width=W,blocks=B,stages=N,groups=G,stem=S,\
             dropout=P,init-gain=K,ws=true]"
        );
        let mut cfg = ModelConfig::default();
        for (k, v) in crate::options::key_values(opts, "--model", s)? {
            cfg.set(k, v)?;
        }
        ensure!(
            cfg.width % cfg.groups == 0,
            "--model {s:?}: groups={} must divide width={}",
            cfg.groups,
            cfg.width
        );
        Ok(cfg)
    }
}

impl fmt::Display for ModelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resnet:width={},blocks={},groups={}",
            self.width, self.blocks, self.groups
        )?;
        // Only where they differ, so that older sweep ids still resume.
        if self.stages != 3 {
            write!(f, ",stages={}", self.stages)?;
        }
        if self.stem != 1 {
            write!(f, ",stem={}", self.stem)?;
        }
        if self.dropout != 0.0 {
            write!(f, ",dropout={}", self.dropout)?;
        }
        if self.init_gain != 1.0 {
            write!(f, ",init-gain={}", self.init_gain)?;
        }
        if self.ws {
            f.write_str(",ws=true")?;
        }
        Ok(())
    }
}

/// One convolution of the model (a normalizer follows each): its channels in and out, kernel,
/// stride, and the side of its (square) input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub side: usize,
}

/// One residual block: its stage (from 1), its index in the stage, its channels and stride.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPlan {
    pub stage: usize,
    pub index: usize,
    pub cin: usize,
    pub cout: usize,
    pub stride: usize,
}

impl BlockPlan {
    /// A 1×1 projection shortcut where the block changes the resolution or the width.
    pub fn has_shortcut(&self) -> bool {
        self.stride != 1 || self.cin != self.cout
    }

    /// Its variables' prefix: `stage2.block0`.
    pub fn name(&self) -> String {
        format!("stage{}.block{}", self.stage, self.index)
    }
}

impl ConvShape {
    pub fn out_side(&self) -> usize {
        self.side.div_ceil(self.stride)
    }
}

impl ModelConfig {
    /// The convolutions, in the order the model applies them, for images of `side`×`side`
    /// with `in_channels` channels.
    pub fn convolutions(&self, in_channels: usize, side: usize) -> Vec<ConvShape> {
        let conv = |cin, cout, kernel, stride, side| ConvShape {
            cin,
            cout,
            kernel,
            stride,
            side,
        };
        let mut convs = vec![conv(in_channels, self.width, 3, self.stem, side)];
        let mut side = side.div_ceil(self.stem);
        for b in self.block_plan() {
            convs.push(conv(b.cin, b.cout, 3, b.stride, side));
            if b.has_shortcut() {
                convs.push(conv(b.cin, b.cout, 1, b.stride, side));
            }
            side = side.div_ceil(b.stride);
            convs.push(conv(b.cout, b.cout, 3, 1, side));
        }
        convs
    }

    /// The residual blocks after the stem, in order: `blocks` per stage, the first of every
    /// stage after the first at stride 2. The one plan that building the model and listing
    /// its convolutions both follow.
    pub fn block_plan(&self) -> Vec<BlockPlan> {
        let mut plan = Vec::with_capacity(self.stages * self.blocks);
        let mut cin = self.width;
        for stage in 0..self.stages {
            let cout = self.width << stage;
            for index in 0..self.blocks {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                plan.push(BlockPlan {
                    stage: stage + 1,
                    index,
                    cin,
                    cout,
                    stride,
                });
                cin = cout;
            }
        }
        plan
    }

    /// Bytes a training job needs at batch size `batch` (at least): the weights with their
    /// gradients and momentum, and per image each convolution's columns, output and the few
    /// tensors the normalizer, the activation and the backward keep of its size. An estimate,
    /// for refusing sizes that cannot fit before anything is allocated.
    pub fn training_bytes(
        &self,
        in_channels: usize,
        side: usize,
        classes: usize,
        batch: usize,
    ) -> u128 {
        // The widths are checked against memory only here: count in u128, before any
        // product of them could overflow.
        let w = self.width as u128;
        let widest = w.saturating_mul(1 << (self.stages - 1));
        if widest > 1 << 40 {
            return u128::MAX;
        }
        let convs = self.convolutions(in_channels, side);
        let weights: u128 = convs
            .iter()
            .map(|c| {
                let (i, o, k) = (c.cin as u128, c.cout as u128, c.kernel as u128);
                i * o * k * k + 2 * o
            })
            .sum::<u128>()
            + (widest + 1) * classes as u128;
        let per_image: u128 = convs
            .iter()
            .map(|c| {
                let (i, o, k, s) = (
                    c.cin as u128,
                    c.cout as u128,
                    c.kernel as u128,
                    c.out_side() as u128,
                );
                (i * k * k + 6 * o) * s * s
            })
            .sum();
        4 * (3 * weights + batch as u128 * per_image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse_and_reject_bad_input() {
        let cfg: ModelConfig = "resnet:width=8,groups=4".parse().unwrap();
        assert_eq!(
            cfg,
            ModelConfig {
                width: 8,
                groups: 4,
                ..Default::default()
            }
        );
        assert_eq!(cfg.to_string().parse::<ModelConfig>().unwrap(), cfg);
        assert_eq!(cfg.to_string(), "resnet:width=8,blocks=1,groups=4");
        let strided: ModelConfig = "resnet:stem=2".parse().unwrap();
        assert_eq!(
            strided.to_string(),
            "resnet:width=16,blocks=1,groups=8,stem=2"
        );
        let deep: ModelConfig = "resnet:stages=4".parse().unwrap();
        assert_eq!(
            deep.to_string(),
            "resnet:width=16,blocks=1,groups=8,stages=4"
        );
        let convs = deep.convolutions(3, 16);
        // Stem, then per stage two 3×3 convolutions, with a shortcut in every stage but the first.
        assert_eq!(convs.len(), 1 + 2 * 4 + 3);
        let last = convs.last().unwrap();
        assert_eq!((last.cout, last.out_side()), (128, 2));
        assert_eq!(strided.to_string().parse::<ModelConfig>().unwrap(), strided);
        let ws: ModelConfig = "resnet:ws=true".parse().unwrap();
        assert!(ws.ws);
        assert_eq!(ws.to_string(), "resnet:width=16,blocks=1,groups=8,ws=true");
        assert_eq!(ws.to_string().parse::<ModelConfig>().unwrap(), ws);
        for (bad, msg) in [
            ("vgg", "unknown model"),
            ("resnet:width=0", "positive whole number"),
            ("resnet:width=12,groups=8", "must divide"),
            ("resnet:depth=3", "unknown --model option"),
            ("resnet:stem=3", "must be 1 or 2"),
            ("resnet:stages=6", "use 1 to 5"),
            ("resnet:dropout=1", "dropout must be in [0, 1)"),
            ("resnet:init-gain=0", "init-gain must be a number > 0"),
            ("resnet:dropout=x", "is not a number"),
            ("resnet:ws=yes", "not a boolean"),
        ] {
            let e = bad.parse::<ModelConfig>().unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
