//! One training run: a model, a normalizer, a batch size and a seed, trained with SGD and
//! evaluated three ways.

use crate::data::{Dataset, Split};
use crate::model::{is_normalizer_var, is_running_stat, Mode, ModelConfig, ResNet};
use crate::optim::Sgd;
use crate::results::{EpochRow, RunKey, RunRow};
use crate::vary::Setting;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use conv::ConvImpl;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Everything a run's numbers depend on besides the normalizer, batch size and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: String,
    pub epochs: usize,
    /// Learning rate at 32 images per step; a step of N images uses base_lr · N / 32.
    pub base_lr: f64,
    pub warmup_epochs: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Batch size of the large-batch evaluation with batch statistics.
    pub large_eval_batch: usize,
    pub conv: String,
    /// Simulated devices: each step trains on `devices` batches of the run's batch size, the
    /// normalizers taking batch statistics over each device's batch alone (data-parallel
    /// training without synchronized BatchNorm, as in the GroupNorm paper's 8 GPUs).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub devices: usize,
}

fn one() -> usize {
    1
}

/// Left out of the settings at 1, so that sweeps from before devices keep their ids.
fn is_one(n: &usize) -> bool {
    *n == 1
}

impl TrainConfig {
    /// The default protocol at one epoch with one warm-up epoch: what unit tests start from.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            model: "resnet".into(),
            epochs: 1,
            base_lr: 0.1,
            warmup_epochs: 1.0,
            momentum: 0.9,
            weight_decay: 5e-4,
            large_eval_batch: 250,
            conv: "fast".into(),
            devices: 1,
        }
    }

    /// This config with the values of a `--vary` setting in place of its own.
    pub fn with_setting(&self, setting: &Setting) -> Result<TrainConfig> {
        let mut cfg = self.clone();
        for (key, value) in setting {
            let number = || -> Result<f64> {
                value
                    .parse()
                    .with_context(|| format!("{key}={value:?} is not a number"))
            };
            match key.as_str() {
                "base-lr" => cfg.base_lr = number()?,
                "weight-decay" => cfg.weight_decay = number()?,
                "epochs" => cfg.epochs = number()? as usize,
                "devices" => cfg.devices = number()? as usize,
                "warmup-epochs" => cfg.warmup_epochs = number()?,
                "momentum" => cfg.momentum = number()?,
                "dropout" | "init-gain" => {
                    let mut model: ModelConfig = cfg.model.parse()?;
                    model.set(key, value)?;
                    cfg.model = model.to_string();
                }
                _ => bail!(
                    "unknown varied key {key:?}; the keys are {}",
                    crate::vary::known_keys()
                ),
            }
        }
        Ok(cfg)
    }
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps to `peak`, then a
/// cosine decay to 0.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn batch(
    split: &Split,
    idx: &[usize],
    image_len: usize,
    shape: (usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let mut images = Vec::with_capacity(idx.len() * image_len);
    for &i in idx {
        images.extend_from_slice(&split.images[i * image_len..(i + 1) * image_len]);
    }
    let labels: Vec<u32> = idx.iter().map(|&i| split.labels[i] as u32).collect();
    let (c, h, w) = shape;
    Ok((
        Tensor::from_vec(images, (idx.len(), c, h, w), &Device::Cpu)?,
        Tensor::from_vec(labels, idx.len(), &Device::Cpu)?,
    ))
}

/// Test error in percent, evaluating in batches of `batch_size` (the last one may be smaller).
pub fn test_error(model: &ResNet, ds: &Dataset, batch_size: usize, mode: Mode) -> Result<f64> {
    let shape = (ds.channels, ds.height, ds.width);
    let idx: Vec<usize> = (0..ds.test.len()).collect();
    let mut wrong = 0usize;
    for chunk in idx.chunks(batch_size) {
        let (x, y) = batch(&ds.test, chunk, ds.image_len(), shape)?;
        let pred = model.forward(&x, mode)?.argmax(1)?;
        wrong += pred
            .ne(&y)?
            .to_dtype(candle_core::DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
    }
    Ok(100.0 * wrong as f64 / ds.test.len() as f64)
}

/// SGD over the model's trainable variables (in name order), with weight decay on all but the
/// normalizers' and without the running statistics.
pub fn optimizer(varmap: &VarMap, cfg: &TrainConfig) -> Result<Sgd> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    let mut named: Vec<_> = data.iter().filter(|(n, _)| !is_running_stat(n)).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let params = named
        .into_iter()
        .map(|(n, v)| (v.clone(), !is_normalizer_var(n)))
        .collect();
    Ok(Sgd::new(params, cfg.momentum, cfg.weight_decay))
}

/// One SGD step on the batch (x, y); the loss before the step, or None if it is not finite
/// (the step is then skipped).
pub fn train_step(
    model: &ResNet,
    sgd: &mut Sgd,
    x: &Tensor,
    y: &Tensor,
    lr: f64,
) -> Result<Option<f64>> {
    let logits = model.forward(x, Mode::Train)?;
    let loss = candle_nn::loss::cross_entropy(&logits, y)?;
    let value = loss.to_scalar::<f32>()? as f64;
    if !value.is_finite() {
        return Ok(None);
    }
    sgd.step(&loss.backward()?, lr)?;
    Ok(Some(value))
}

/// Whether every variable (weights and running statistics) holds finite values only.
pub fn all_finite(varmap: &VarMap) -> Result<bool> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned VarMap"))?;
    for var in data.values() {
        // NaN and ±inf survive a sum (inf − inf is NaN); finite values this model holds do not
        // overflow f64.
        let sum = var
            .as_tensor()
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?;
        if !sum.to_scalar::<f64>()?.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Trains and evaluates one run; `on_epoch` sees each epoch's row as it completes.
pub fn run(
    key: &RunKey,
    cfg: &TrainConfig,
    ds: &Dataset,
    mut on_epoch: impl FnMut(&EpochRow),
) -> Result<(RunRow, Vec<EpochRow>)> {
    let start = Instant::now();
    let model_cfg: ModelConfig = cfg.model.parse()?;
    let conv_impl: ConvImpl = cfg.conv.parse()?;
    let varmap = VarMap::new();
    let b = key.batch_size;
    let model = ResNet::new(
        model_cfg,
        ds.channels,
        ds.classes,
        &key.norm,
        conv_impl,
        &varmap,
        key.seed,
    )?
    .on_devices(b, cfg.devices)?;
    let mut sgd = optimizer(&varmap, cfg)?;

    // One step: `devices` batches of b images, one SGD update over all of them.
    let step_images = b * cfg.devices;
    let steps_per_epoch = ds.train.len() / step_images;
    let total = steps_per_epoch * cfg.epochs;
    let warmup = ((cfg.warmup_epochs * steps_per_epoch as f64).round() as usize).min(total);
    let peak = cfg.base_lr * step_images as f64 / 32.0;
    let shape = (ds.channels, ds.height, ds.width);
    let mut rng = ChaCha8Rng::seed_from_u64(key.seed ^ 0x005e_ed0f_da7a);
    let mut order: Vec<usize> = (0..ds.train.len()).collect();
    let (mut step, mut diverged, mut train_loss) = (0, false, f64::NAN);
    let mut epochs = Vec::new();

    'training: for epoch in 1..=cfg.epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut lr = peak;
        for chunk in order.chunks_exact(step_images) {
            let (x, y) = batch(&ds.train, chunk, ds.image_len(), shape)?;
            lr = learning_rate(step, total, warmup, peak);
            let Some(value) = train_step(&model, &mut sgd, &x, &y, lr)? else {
                diverged = true;
                break 'training;
            };
            loss_sum += value;
            step += 1;
        }
        train_loss = loss_sum / steps_per_epoch as f64;
        let row = EpochRow {
            norm: key.norm.clone(),
            batch_size: b,
            seed: key.seed,
            epoch,
            lr,
            train_loss,
            test_error: test_error(&model, ds, cfg.large_eval_batch, Mode::Eval)?,
            vary: key.vary.clone(),
        };
        on_epoch(&row);
        epochs.push(row);
    }

    // The last step can leave non-finite weights behind a finite loss: that run diverged too.
    diverged = diverged || !all_finite(&varmap)?;
    let (err, err_b, err_large) = if diverged {
        (f64::NAN, f64::NAN, f64::NAN)
    } else {
        (
            epochs.last().map_or(f64::NAN, |e| e.test_error),
            test_error(&model, ds, b, Mode::BatchStats)?,
            test_error(&model, ds, cfg.large_eval_batch, Mode::BatchStats)?,
        )
    };
    let precise = if diverged {
        None
    } else {
        precise_error(&model, ds, b, cfg)?
    };
    let row = RunRow {
        norm: key.norm.clone(),
        batch_size: b,
        seed: key.seed,
        lr: peak,
        epochs: cfg.epochs,
        steps: step,
        test_error: err,
        test_error_batch_stats: err_b,
        test_error_large_batch_stats: err_large,
        train_loss: if diverged { f64::NAN } else { train_loss },
        wall_seconds: start.elapsed().as_secs_f64(),
        diverged,
        test_error_precise: precise,
        vary: key.vary.clone(),
    };
    Ok((row, epochs))
}

/// The test error with PreciseBN's statistics: the training set in order, in batches of the
/// training batch size `b` (the last partial one left out, as in training), pooled into every
/// normalizer's running statistics; `None` when no normalizer keeps them. Last, since it
/// replaces the running statistics the other columns use.
fn precise_error(model: &ResNet, ds: &Dataset, b: usize, cfg: &TrainConfig) -> Result<Option<f64>> {
    let shape = (ds.channels, ds.height, ds.width);
    let idx: Vec<usize> = (0..ds.train.len()).collect();
    let batches = idx
        .chunks_exact(b)
        .map(|chunk| Ok(batch(&ds.train, chunk, ds.image_len(), shape)?.0));
    if !model.precise_stats(batches)? {
        return Ok(None);
    }
    Ok(Some(test_error(
        model,
        ds,
        cfg.large_eval_batch,
        Mode::Eval,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_weights_are_found() {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
        let w = vb.get((2, 3), "w").unwrap();
        assert!(all_finite(&varmap).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = vec![0.5f32; 6];
            values[4] = bad;
            let data = varmap.data().lock().unwrap();
            data["w"]
                .set(&Tensor::from_vec(values, (2, 3), &Device::Cpu).unwrap())
                .unwrap();
            drop(data);
            assert!(!all_finite(&varmap).unwrap(), "{bad}");
        }
        drop(w);
    }

    /// Two devices of 2 images with `bn` train exactly as one batch of 4 with Ghost BatchNorm
    /// over pairs: the same steps, rate, statistics and running statistics.
    #[test]
    fn devices_take_statistics_per_device_batch_and_step_over_all() {
        let ds = "synthetic:train=48,test=20,size=8"
            .parse::<crate::data::DatasetSpec>()
            .unwrap()
            .load()
            .unwrap();
        let cfg = TrainConfig {
            model: "resnet:width=4,groups=2,stages=2".into(),
            epochs: 2,
            ..TrainConfig::for_tests()
        };
        let key = |norm: &str, batch_size| RunKey {
            norm: norm.into(),
            batch_size,
            seed: 3,
            vary: vec![],
        };
        let two = TrainConfig {
            devices: 2,
            ..cfg.clone()
        };
        let (a, ea) = run(&key("bn", 2), &two, &ds, |_| {}).unwrap();
        let (g, eg) = run(&key("ghostbn:virtual=2", 4), &cfg, &ds, |_| {}).unwrap();
        let (p, _) = run(&key("bn", 2), &cfg, &ds, |_| {}).unwrap();
        assert_eq!((a.steps, g.steps, p.steps), (24, 24, 48));
        assert_eq!(
            (a.lr, g.lr, p.lr),
            (0.1 * 4.0 / 32.0, 0.1 * 4.0 / 32.0, 0.1 * 2.0 / 32.0)
        );
        assert_eq!(a.batch_size, 2, "the batch size is the device's");
        assert_eq!(a.train_loss, g.train_loss);
        assert_eq!(
            (a.test_error, a.test_error_batch_stats),
            (g.test_error, g.test_error_batch_stats)
        );
        assert_eq!(
            ea.iter().map(|e| e.train_loss).collect::<Vec<_>>(),
            eg.iter().map(|e| e.train_loss).collect::<Vec<_>>()
        );
        assert_ne!(a.train_loss, p.train_loss, "one device of 2 is another run");
    }

    #[test]
    fn a_setting_replaces_the_configs_values() {
        let cfg = TrainConfig::for_tests();
        let axes = crate::vary::parse(
            &[
                "base-lr=0.4",
                "weight-decay=0",
                "epochs=3",
                "warmup-epochs=0.5",
                "momentum=0",
                "dropout=0.3",
                "init-gain=4",
                "devices=8",
            ]
            .map(String::from),
        )
        .unwrap();
        let got = cfg.with_setting(&crate::vary::settings(&axes)[0]).unwrap();
        assert_eq!(
            (
                got.base_lr,
                got.weight_decay,
                got.epochs,
                got.warmup_epochs,
                got.momentum,
                got.devices
            ),
            (0.4, 0.0, 3, 0.5, 0.0, 8)
        );
        assert_eq!(
            got.model,
            "resnet:width=16,blocks=1,groups=8,dropout=0.3,init-gain=4"
        );
        assert_eq!(cfg.with_setting(&Vec::new()).unwrap(), cfg);
    }

    #[test]
    fn learning_rate_warms_up_linearly_then_decays_to_zero() {
        let (total, warmup, peak) = (100, 10, 0.4);
        assert!((learning_rate(0, total, warmup, peak) - 0.04).abs() < 1e-12);
        assert!((learning_rate(9, total, warmup, peak) - 0.4).abs() < 1e-12);
        assert!((learning_rate(10, total, warmup, peak) - 0.4).abs() < 1e-12);
        assert!((learning_rate(55, total, warmup, peak) - 0.2).abs() < 1e-12);
        assert!(learning_rate(99, total, warmup, peak) < 1e-3);
        for s in 10..99 {
            assert!(
                learning_rate(s + 1, total, warmup, peak) <= learning_rate(s, total, warmup, peak)
            );
        }
    }
}
