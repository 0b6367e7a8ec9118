//! A small ResNet for the sweep: a 3×3 stem, three (or `stages`) stages of residual blocks at
//! widths w, 2w, 4w, … (the first block of every stage after the first halves the resolution,
//! with a 1×1 projection shortcut), global average pooling and a linear classifier. A normalizer, chosen by spec, follows every
//! convolution; the last normalizer of each residual block starts with weight 0 (Goyal et al.
//! 2017, as in the GroupNorm paper), so each block starts as the identity.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use conv::{conv2d_no_bias, Conv2d, Conv2dConfig, ConvImpl};
use normalizers::Normalizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

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
        let (mut side, mut cin) = (side.div_ceil(self.stem), self.width);
        for stage in 0..self.stages {
            let cout = self.width << stage;
            for b in 0..self.blocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                convs.push(conv(cin, cout, 3, stride, side));
                if stride != 1 || cin != cout {
                    convs.push(conv(cin, cout, 1, stride, side));
                }
                side = side.div_ceil(stride);
                convs.push(conv(cout, cout, 3, 1, side));
                cin = cout;
            }
        }
        convs
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

/// Where normalizers take their statistics from in one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: batch statistics, running statistics updated.
    Train,
    /// Evaluation: running statistics where tracked.
    Eval,
    /// Evaluation with the statistics of the evaluated batch, running statistics untouched.
    BatchStats,
    /// PreciseBN's pass: normalizers as in training (their statistics pooled, see
    /// [`ResNet::precise_stats`]), no dropout.
    Stats,
}

#[derive(Debug)]
struct ConvNorm {
    conv: Conv2d,
    norm: Box<dyn Normalizer>,
}

impl ConvNorm {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        norm: &str,
        conv: (ConvImpl, bool),
        vb: VarBuilder,
    ) -> Result<Self> {
        let (conv_impl, ws) = conv;
        let cfg = Conv2dConfig {
            stride,
            padding: kernel / 2,
            dilation: 1,
        };
        Ok(Self {
            conv: conv2d_no_bias(cin, cout, kernel, cfg, conv_impl, vb.pp("conv"))?
                .with_weight_standardization(ws),
            norm: normalizers::from_spec(norm, cout, vb.pp("norm"))
                .with_context(|| format!("cannot build normalizer {norm:?} for {cout} channels"))?,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        Ok(match mode {
            Mode::Train | Mode::Stats => self.norm.forward_t(&y, true)?,
            Mode::Eval => self.norm.forward_t(&y, false)?,
            Mode::BatchStats => self.norm.forward_batch_stats(&y)?,
        })
    }

    /// Convolution, normalizer and ReLU, the ReLU left out after a norm-activation layer (FRN
    /// with TLU, EvoNorm), which replaces normalizer + ReLU as in timm.
    fn forward_act(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = self.forward(x, mode)?;
        if self.norm.norm_spec().is_norm_activation() {
            Ok(y)
        } else {
            Ok(y.relu()?)
        }
    }
}

#[derive(Debug)]
struct Block {
    first: ConvNorm,
    second: ConvNorm,
    shortcut: Option<ConvNorm>,
}

impl Block {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let y = self.first.forward_act(x, mode)?;
        let y = self.second.forward(&y, mode)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x, mode)?,
            None => x.clone(),
        };
        Ok((y + skip)?.relu()?)
    }
}

#[derive(Debug)]
pub struct ResNet {
    stem: ConvNorm,
    blocks: Vec<Block>,
    fc_weight: Tensor,
    fc_bias: Tensor,
    dropout: f64,
    /// Draws the dropout masks, seeded from the run's seed (candle's CPU RNG cannot be seeded).
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl ResNet {
    /// Builds the model with its variables in `varmap` and draws their initial values from
    /// `seed`: convolutions Kaiming-normal (fan-out, as torchvision's ResNet), the classifier
    /// uniform in ±1/sqrt(fan_in) (PyTorch's Linear), normalizer weights 1 and biases 0, and the
    /// last normalizer weight of every block 0.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: ModelConfig,
        in_channels: usize,
        classes: usize,
        norm: &str,
        conv_impl: ConvImpl,
        varmap: &VarMap,
        seed: u64,
    ) -> Result<Self> {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let w = cfg.width;
        let (norm, ws) = split_ws(norm);
        let conv_impl = (conv_impl, cfg.ws || ws);
        let stem = ConvNorm::new(in_channels, w, 3, cfg.stem, norm, conv_impl, vb.pp("stem"))?;
        let mut blocks = Vec::new();
        let mut cin = w;
        for stage in 0..cfg.stages {
            let cout = w << stage;
            for b in 0..cfg.blocks {
                let vb = vb.pp(format!("stage{}.block{b}", stage + 1));
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let shortcut = (stride != 1 || cin != cout)
                    .then(|| {
                        ConvNorm::new(cin, cout, 1, stride, norm, conv_impl, vb.pp("shortcut"))
                    })
                    .transpose()?;
                blocks.push(Block {
                    first: ConvNorm::new(cin, cout, 3, stride, norm, conv_impl, vb.pp("first"))?,
                    second: ConvNorm::new(cout, cout, 3, 1, norm, conv_impl, vb.pp("second"))?,
                    shortcut,
                });
                cin = cout;
            }
        }
        let fc = vb.pp("fc");
        let model = Self {
            stem,
            blocks,
            fc_weight: fc.get((classes, cin), "weight")?,
            fc_bias: fc.get(classes, "bias")?,
            dropout: cfg.dropout,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0xd60f_0a7e)),
        };
        initialize(varmap, seed, cfg.init_gain)?;
        Ok(model)
    }

    /// Logits (N, classes) for images (N, C, H, W).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut y = self.stem.forward_act(x, mode)?;
        for block in &self.blocks {
            y = block.forward(&y, mode)?;
        }
        let mut pooled = y.mean((2, 3))?;
        if mode == Mode::Train && self.dropout > 0.0 {
            pooled = self.drop(&pooled)?;
        }
        Ok(pooled
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?)
    }
}

impl ResNet {
    /// Every normalizer of the model.
    fn norms(&self) -> Vec<&dyn Normalizer> {
        let mut convs = vec![&self.stem];
        for b in &self.blocks {
            convs.extend([&b.first, &b.second]);
            convs.extend(&b.shortcut);
        }
        convs.into_iter().map(|c| c.norm.as_ref()).collect()
    }

    /// PreciseBN (Wu & Johnson 2021; fvcore's `update_bn_stats`): with the weights frozen,
    /// recomputes every normalizer's running statistics as the pooled mean and variance of its
    /// inputs over `batches` (the training set at the training batch size). Returns `false`,
    /// touching nothing, when no normalizer keeps running statistics.
    pub fn precise_stats(&self, batches: impl Iterator<Item = Result<Tensor>>) -> Result<bool> {
        let mut any = false;
        for norm in self.norms() {
            any |= norm.start_precise_stats()?;
        }
        if !any {
            return Ok(false);
        }
        for x in batches {
            self.forward(&x?, Mode::Stats)?;
        }
        for norm in self.norms() {
            norm.finish_precise_stats()?;
        }
        Ok(true)
    }

    /// Inverted dropout: each value kept with probability 1 − p and scaled by 1/(1 − p).
    fn drop(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.dropout;
        let keep = 1.0 / (1.0 - p);
        let mut rng = self
            .dropout_rng
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned dropout RNG"))?;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        Ok(x.mul(&Tensor::from_vec(mask, x.dims(), x.device())?)?)
    }
}

/// Draws every variable's initial value from `seed`, in the sorted order of the names; the
/// convolution and classifier weights are multiplied by `gain`.
fn initialize(varmap: &VarMap, seed: u64, gain: f64) -> Result<()> {
    let gain = gain as f32;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("conv.weight") {
            let fan_out = (dims[0] * dims[2] * dims[3]) as f32;
            let normal = Normal::new(0.0, (2.0 / fan_out).sqrt())?;
            (0..n).map(|_| normal.sample(&mut rng) * gain).collect()
        } else if name.starts_with("fc.") {
            let fan_in = *data["fc.weight"].dims().last().unwrap_or(&1) as f32;
            let bound = 1.0 / fan_in.sqrt();
            let uniform = Uniform::new(-bound, bound)?;
            let g = if name == "fc.weight" { gain } else { 1.0 };
            (0..n).map(|_| uniform.sample(&mut rng) * g).collect()
        } else if name.ends_with("second.norm.weight") {
            vec![0.0; n]
        } else {
            continue; // normalizer weights (1), biases (0) and running statistics keep their init
        };
        set(var, Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(())
}

fn set(var: &Var, value: Tensor) -> Result<()> {
    var.set(&value.to_dtype(var.dtype())?)?;
    Ok(())
}

/// The suffix that adds Weight Standardization to one entry of `--norms` (`gn:groups=8+ws`).
pub const WS_SUFFIX: &str = "+ws";

/// A `--norms` entry as its normalizer spec and whether it asks for Weight Standardization.
pub fn split_ws(norm: &str) -> (&str, bool) {
    let n = norm.len();
    if n >= WS_SUFFIX.len() && norm[n - WS_SUFFIX.len()..].eq_ignore_ascii_case(WS_SUFFIX) {
        (&norm[..n - WS_SUFFIX.len()], true)
    } else {
        (norm, false)
    }
}

/// Whether a variable is a normalizer's (no weight decay) or a running statistic (not trained).
pub fn is_normalizer_var(name: &str) -> bool {
    name.contains(".norm.")
}

pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of variable `name` of `vm`, flattened.
    fn value(vm: &VarMap, name: &str) -> Vec<f32> {
        vm.data().lock().unwrap()[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

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

    #[test]
    fn ws_from_the_model_or_a_norms_suffix_standardizes_every_convolution() {
        let logits = |model: &str, norm: &str| -> Vec<f32> {
            let varmap = VarMap::new();
            let cfg: ModelConfig = model.parse().unwrap();
            let net = ResNet::new(cfg, 3, 4, norm, ConvImpl::Fast, &varmap, 5).unwrap();
            let x = Tensor::from_vec(
                (0..2 * 3 * 8 * 8)
                    .map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0)
                    .collect::<Vec<_>>(),
                (2, 3, 8, 8),
                &Device::Cpu,
            )
            .unwrap();
            net.forward(&x, Mode::Eval)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let plain = logits("resnet:width=8,groups=4", "gn:groups=4");
        let suffix = logits("resnet:width=8,groups=4", "gn:groups=4+ws");
        let option = logits("resnet:width=8,groups=4,ws=true", "gn:groups=4");
        assert_eq!(
            suffix, option,
            "the suffix and the model option are one thing"
        );
        assert_ne!(suffix, plain, "standardized weights change the output");
        assert_eq!(split_ws("gn:groups=4+WS"), ("gn:groups=4", true));
        assert_eq!(split_ws("gn"), ("gn", false));
    }

    #[test]
    fn init_gain_scales_the_initial_weights_and_dropout_is_seeded_and_train_only() {
        let build = |spec: &str| {
            let varmap = VarMap::new();
            let cfg: ModelConfig = spec.parse().unwrap();
            let model = ResNet::new(cfg, 3, 10, "gn:groups=8", ConvImpl::Fast, &varmap, 7).unwrap();
            (model, varmap)
        };
        let ((_, one), (_, four)) = (build("resnet"), build("resnet:init-gain=4"));
        for name in ["stem.conv.weight", "fc.weight"] {
            let (a, b) = (value(&one, name), value(&four, name));
            assert!(a.iter().zip(&b).all(|(x, y)| *y == 4.0 * x), "{name}");
        }
        assert_eq!(
            value(&one, "fc.bias"),
            value(&four, "fc.bias"),
            "biases keep their draw"
        );

        let x = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &Device::Cpu).unwrap();
        let logits = |m: &ResNet, mode| {
            m.forward(&x, mode)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let ((plain, _), (a, _), (b, _)) = (
            build("resnet"),
            build("resnet:dropout=0.5"),
            build("resnet:dropout=0.5"),
        );
        assert_eq!(
            logits(&a, Mode::Eval),
            logits(&plain, Mode::Eval),
            "no dropout in evaluation"
        );
        let (ta, tb) = (logits(&a, Mode::Train), logits(&b, Mode::Train));
        assert_eq!(ta, tb, "the same seed draws the same masks");
        assert_ne!(ta, logits(&plain, Mode::Train));
        assert_ne!(logits(&a, Mode::Train), ta, "a new mask at each step");
    }

    #[test]
    fn initialization_is_seeded_and_zeroes_the_last_norm_of_each_block() {
        let build = |seed| {
            let varmap = VarMap::new();
            let model = ResNet::new(
                ModelConfig::default(),
                3,
                10,
                "bn",
                ConvImpl::Fast,
                &varmap,
                seed,
            )
            .unwrap();
            (model, varmap)
        };
        let ((_, a), (_, b), (_, c)) = (build(1), build(1), build(2));
        let w = "stage2.block0.first.conv.weight";
        assert_eq!(value(&a, w), value(&b, w));
        assert_ne!(value(&a, w), value(&c, w));
        assert!(value(&a, "stage1.block0.second.norm.weight")
            .iter()
            .all(|&v| v == 0.0));
        assert!(value(&a, "stage1.block0.first.norm.weight")
            .iter()
            .all(|&v| v == 1.0));
        let std = {
            let v = value(&a, w);
            (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
        };
        let expected = (2.0f32 / (32.0 * 9.0)).sqrt();
        assert!(
            (std / expected - 1.0).abs() < 0.1,
            "kaiming std {std} vs {expected}"
        );
    }

    #[test]
    fn the_listed_convolutions_are_the_model_s() {
        for cfg in [
            "resnet",
            "resnet:blocks=2,stem=2",
            "resnet:width=8,groups=4",
        ] {
            let cfg: ModelConfig = cfg.parse().unwrap();
            let varmap = VarMap::new();
            ResNet::new(cfg, 3, 10, "bn", ConvImpl::Fast, &varmap, 0).unwrap();
            let mut built: Vec<Vec<usize>> = varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| n.ends_with("conv.weight"))
                .map(|(_, v)| v.dims().to_vec())
                .collect();
            let mut listed: Vec<Vec<usize>> = cfg
                .convolutions(3, 16)
                .iter()
                .map(|c| vec![c.cout, c.cin, c.kernel, c.kernel])
                .collect();
            built.sort();
            listed.sort();
            assert_eq!(built, listed, "{cfg}");
        }
        let last = *ModelConfig::default().convolutions(3, 16).last().unwrap();
        assert_eq!((last.cout, last.out_side()), (64, 4));
    }

    #[test]
    fn no_relu_follows_a_norm_activation_layer() {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
        let min = |t: &Tensor| {
            t.flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for (norm, own_activation) in [
            ("bn", false),
            ("frn:tlu=false", false),
            ("frn", true),
            ("evonorm-s0:groups=4", true),
            ("evonorm-b0", true),
        ] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            let layer = ConvNorm::new(3, 8, 3, 1, norm, (ConvImpl::Fast, false), vb).unwrap();
            if norm == "frn" {
                // TLU's threshold below zero, so that its output has negative values.
                let tau = vm.data().lock().unwrap()["norm.tau"].clone();
                tau.set(&Tensor::full(-0.5f32, 8, &Device::Cpu).unwrap())
                    .unwrap();
            }
            let plain = layer.forward(&x, Mode::Train).unwrap();
            let act = layer.forward_act(&x, Mode::Train).unwrap();
            assert!(min(&plain) < 0.0, "{norm}: a test without negative values");
            let expected = if own_activation {
                plain
            } else {
                plain.relu().unwrap()
            };
            let diff = (act - expected).unwrap().abs().unwrap();
            assert_eq!(
                diff.flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0,
                "{norm}"
            );
        }
    }

    #[test]
    fn forward_gives_logits_per_image() {
        for stem in [1, 2] {
            let varmap = VarMap::new();
            let cfg = ModelConfig {
                stem,
                ..Default::default()
            };
            let model = ResNet::new(cfg, 3, 10, "gn:groups=8", ConvImpl::Fast, &varmap, 0).unwrap();
            let x = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
            for mode in [Mode::Train, Mode::Eval, Mode::BatchStats] {
                assert_eq!(model.forward(&x, mode).unwrap().dims(), [2, 10]);
            }
        }
    }
}
