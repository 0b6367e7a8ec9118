//! A small ResNet for the sweep: a 3×3 stem, three (or `stages`) stages of residual blocks at
//! widths w, 2w, 4w, … (the first block of every stage after the first halves the resolution,
//! with a 1×1 projection shortcut), global average pooling and a linear classifier. A
//! normalizer, chosen by spec, follows every convolution; the last normalizer of each residual
//! block starts with weight 0 (Goyal et al. 2017, as in the GroupNorm paper), so each block
//! starts as the identity. The spec and the block plan are in `config`.

mod config;

pub use config::{ConvShape, ModelConfig};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use conv::{conv2d_no_bias, Conv2d, Conv2dConfig, ConvImpl};
use normalizers::Normalizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use std::sync::Mutex;

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

    /// This layer with its normalizer's training statistics per device of `size` images.
    fn per_device(self, size: usize) -> Result<Self> {
        Ok(Self {
            conv: self.conv,
            norm: normalizers::per_device(self.norm, size)?,
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
    fn per_device(self, size: usize) -> Result<Self> {
        Ok(Self {
            first: self.first.per_device(size)?,
            second: self.second.per_device(size)?,
            shortcut: self.shortcut.map(|s| s.per_device(size)).transpose()?,
        })
    }

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
        for b in cfg.block_plan() {
            let vb = vb.pp(b.name());
            let (cout, stride) = (b.cout, b.stride);
            let shortcut = b
                .has_shortcut()
                .then(|| ConvNorm::new(b.cin, cout, 1, stride, norm, conv_impl, vb.pp("shortcut")))
                .transpose()?;
            blocks.push(Block {
                first: ConvNorm::new(b.cin, cout, 3, stride, norm, conv_impl, vb.pp("first"))?,
                second: ConvNorm::new(cout, cout, 3, 1, norm, conv_impl, vb.pp("second"))?,
                shortcut,
            });
            cin = cout;
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

    /// The model with every batch-statistics normalizer's training statistics taken over
    /// chunks of `size` consecutive images, as in data-parallel training on devices of `size`
    /// images each without synchronized BatchNorm (`normalizers::per_device`).
    fn per_device(self, size: usize) -> Result<Self> {
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| b.per_device(size))
            .collect::<Result<_>>()?;
        Ok(Self {
            stem: self.stem.per_device(size)?,
            blocks,
            ..self
        })
    }

    /// The model as trained on `devices` simulated devices of `batch` images each: with
    /// statistics per device ([`ResNet::per_device`]) where there are several, itself on one.
    pub fn on_devices(self, batch: usize, devices: usize) -> Result<Self> {
        if devices > 1 {
            self.per_device(batch)
        } else {
            Ok(self)
        }
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
