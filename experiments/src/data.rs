//! Data sets: the embedded synthetic default, and MNIST/Fashion-MNIST (IDX) and CIFAR-10
//! (binary batches) read from a path. Images are NCHW f32, standardized per channel with the
//! training set's mean and standard deviation.

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f32::consts::PI;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Images and labels of one split.
#[derive(Debug, Clone)]
pub struct Split {
    /// NCHW, `len · channels · height · width` values.
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    pub train: Split,
    pub test: Split,
}

impl Dataset {
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Where a data set comes from: `synthetic[:train=N,test=N,size=S,seed=K,classes=K,jitter=D,
/// exposure=E,envelope=F,contrast=C]`, `mnist:DIR`, `cifar10:DIR`.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    Synthetic(SyntheticConfig),
    Mnist(PathBuf),
    Cifar10(PathBuf),
}

/// The embedded data set's size, seed and difficulty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticConfig {
    pub train: usize,
    pub test: usize,
    pub size: usize,
    pub seed: u64,
    /// Number of classes: orientations 180°/classes apart.
    pub classes: usize,
    /// Each image's orientation is its class's ± up to this many degrees (classes are
    /// 180°/classes apart: 18° with the default 10).
    pub jitter: f32,
    /// Each image's exposure (gain) is e^u, u uniform in ± this.
    pub exposure: f32,
    /// Multiplies the grating patch's size (its Gaussian envelope's sigma).
    pub envelope: f32,
    /// The patch's contrast is uniform between this and 1.
    pub contrast: f32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            train: 6000,
            test: 2000,
            size: 16,
            seed: 0,
            classes: 10,
            jitter: 4.0,
            exposure: 0.5,
            envelope: 1.0,
            contrast: 0.5,
        }
    }
}

impl SyntheticConfig {
    /// Sets `key` from `text`; names the key, the value and the accepted range when it fails.
    fn set(&mut self, key: &str, text: &str) -> Result<()> {
        let whole = || -> Result<u64> {
            text.parse()
                .with_context(|| format!("--dataset option {key}={text:?} is not a whole number"))
        };
        let number = |lo: f32, hi: f32| -> Result<f32> {
            let v: f32 = text
                .parse()
                .with_context(|| format!("--dataset option {key}={text:?} is not a number"))?;
            ensure!(
                (lo..=hi).contains(&v),
                "--dataset option {key}={text} is out of range; use {lo} to {hi}"
            );
            Ok(v)
        };
        match key {
            "train" => self.train = whole()? as usize,
            "test" => self.test = whole()? as usize,
            "size" => self.size = whole()? as usize,
            "seed" => self.seed = whole()?,
            "classes" => {
                let k = whole()?;
                ensure!(
                    (2..=90).contains(&k),
                    "--dataset option classes={k} is out of range; use 2 to 90"
                );
                self.classes = k as usize;
            }
            "jitter" => self.jitter = number(0.0, 45.0)?,
            "exposure" => self.exposure = number(0.0, 3.0)?,
            "envelope" => self.envelope = number(0.25, 4.0)?,
            "contrast" => self.contrast = number(0.0, 1.0)?,
            _ => bail!(
                "unknown --dataset option {key:?}; synthetic takes train, test, size, seed, \
                 classes, jitter, exposure, envelope, contrast"
            ),
        }
        Ok(())
    }
}

impl FromStr for DatasetSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        match name {
            "synthetic" => {
                let mut cfg = SyntheticConfig::default();
                for (k, v) in crate::options::key_values(arg, "--dataset", s)? {
                    cfg.set(k, v)?;
                }
                ensure!(
                    cfg.train >= 2 && cfg.test >= 1,
                    "synthetic data needs train >= 2 and test >= 1"
                );
                ensure!(
                    (8..=64).contains(&cfg.size),
                    "synthetic size={} is out of range; use 8 to 64",
                    cfg.size
                );
                Ok(DatasetSpec::Synthetic(cfg))
            }
            "mnist" | "cifar10" if arg.is_empty() => {
                bail!("--dataset {name} needs a folder: --dataset {name}:DIR")
            }
            "mnist" => Ok(DatasetSpec::Mnist(arg.into())),
            "cifar10" => Ok(DatasetSpec::Cifar10(arg.into())),
            _ => bail!("unknown data set {name:?}; expected synthetic, mnist:DIR or cifar10:DIR"),
        }
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Synthetic(c) => {
                write!(
                    f,
                    "synthetic:train={},test={},size={},seed={}",
                    c.train, c.test, c.size, c.seed
                )?;
                // Difficulty keys only where they differ, so that older sweep ids still resume.
                let d = SyntheticConfig::default();
                if c.classes != d.classes {
                    write!(f, ",classes={}", c.classes)?;
                }
                for (key, v, default) in [
                    ("jitter", c.jitter, d.jitter),
                    ("exposure", c.exposure, d.exposure),
                    ("envelope", c.envelope, d.envelope),
                    ("contrast", c.contrast, d.contrast),
                ] {
                    if v != default {
                        write!(f, ",{key}={v}")?;
                    }
                }
                Ok(())
            }
            DatasetSpec::Mnist(p) => write!(f, "mnist:{}", p.display()),
            DatasetSpec::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
        }
    }
}

impl DatasetSpec {
    /// (channels, side, classes, images of both splits) before loading: what sizing needs.
    pub fn shape(&self) -> (usize, usize, usize, u128) {
        match self {
            DatasetSpec::Synthetic(c) => (3, c.size, c.classes, c.train as u128 + c.test as u128),
            DatasetSpec::Mnist(_) => (1, 28, 10, 70_000),
            DatasetSpec::Cifar10(_) => (3, 32, 10, 60_000),
        }
    }

    /// Bytes the loaded images take (f32).
    pub fn bytes(&self) -> u128 {
        let (c, side, _, images) = self.shape();
        4 * images * (c * side * side) as u128
    }

    pub fn load(&self) -> Result<Dataset> {
        let mut ds = match self {
            DatasetSpec::Synthetic(cfg) => synthetic(*cfg),
            DatasetSpec::Mnist(dir) => mnist(dir)?,
            DatasetSpec::Cifar10(dir) => cifar10(dir)?,
        };
        standardize(&mut ds);
        Ok(ds)
    }
}

/// Subtracts the training set's per-channel mean and divides by its standard deviation (both
/// accumulated in f64), in both splits.
fn standardize(ds: &mut Dataset) {
    let plane = ds.height * ds.width;
    let c = ds.channels;
    let (mut sum, mut sq) = (vec![0f64; c], vec![0f64; c]);
    for (i, v) in ds.train.images.iter().enumerate() {
        sum[(i / plane) % c] += *v as f64;
    }
    let count = (ds.train.len() * plane) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    for (i, v) in ds.train.images.iter().enumerate() {
        let ch = (i / plane) % c;
        sq[ch] += (*v as f64 - mean[ch]).powi(2);
    }
    let std: Vec<f64> = sq.iter().map(|s| (s / count).sqrt().max(1e-8)).collect();
    for split in [&mut ds.train, &mut ds.test] {
        for (i, v) in split.images.iter_mut().enumerate() {
            let ch = (i / plane) % c;
            *v = ((*v as f64 - mean[ch]) / std[ch]) as f32;
        }
    }
}

/// The embedded data set: `classes` classes (10 by default) of colour images whose class is
/// the orientation of a grating patch (0°, 18°, …, 162° with 10). Nuisances: the patch's position and size, the grating's
/// frequency and phase, the two colours of the grating and the background's, the contrast, and
/// pixel noise. None of them depends on the class, so per-image colour statistics reveal nothing
/// about it. Generated deterministically from `seed` (ChaCha8).
pub fn synthetic(cfg: SyntheticConfig) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut split = |n: usize| {
        let mut images = Vec::with_capacity(n * 3 * cfg.size * cfg.size);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i % cfg.classes) as u8;
            images.extend(grating_image(label, &cfg, &mut rng));
            labels.push(label);
        }
        Split { images, labels }
    };
    let train = split(cfg.train);
    let test = split(cfg.test);
    Dataset {
        channels: 3,
        height: cfg.size,
        width: cfg.size,
        classes: cfg.classes,
        train,
        test,
    }
}

fn grating_image(label: u8, cfg: &SyntheticConfig, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let size = cfg.size;
    let s = size as f32;
    // Each draw is the default's, then scaled, so that the default data set keeps its bits.
    let jitter = rng.random_range(-4.0f32..4.0) * (cfg.jitter / 4.0);
    let theta = (label as f32 * (180.0 / cfg.classes as f32) + jitter) * PI / 180.0;
    let freq = rng.random_range(0.16..0.30);
    let phase = rng.random_range(0.0..2.0 * PI);
    let (cx, cy) = (
        rng.random_range(0.3 * s..0.7 * s),
        rng.random_range(0.3 * s..0.7 * s),
    );
    let sigma = cfg.envelope * rng.random_range(0.18 * s..0.35 * s);
    let contrast =
        cfg.contrast + (rng.random_range(0.5f32..1.0) - 0.5) * 2.0 * (1.0 - cfg.contrast);
    let noise = rng.random_range(0.03..0.12);
    // Exposure and colour cast: images differ in overall gain and per-channel offset, as
    // photographs do; per-sample normalizers remove them, batch statistics of two images cannot.
    let gain = (rng.random_range(-0.5f32..0.5) * (cfg.exposure / 0.5)).exp();
    let cast = [
        rng.random_range(-0.25..0.25),
        rng.random_range(-0.25..0.25),
        rng.random_range(-0.25..0.25),
    ];
    let mut colour = || {
        [
            rng.random::<f32>(),
            rng.random::<f32>(),
            rng.random::<f32>(),
        ]
    };
    let (fg, bg, back) = (colour(), colour(), colour());
    let (dx, dy) = (theta.cos(), theta.sin());
    let mut img = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let r2 = (fx - cx).powi(2) + (fy - cy).powi(2);
            let envelope = contrast * (-r2 / (2.0 * sigma * sigma)).exp();
            let wave = 0.5 + 0.5 * (2.0 * PI * freq * (fx * dx + fy * dy) + phase).sin();
            for c in 0..3 {
                let pattern = wave * fg[c] + (1.0 - wave) * bg[c];
                let v = back[c] + envelope * (pattern - back[c]);
                img[(c * size + y) * size + x] = gain * v + cast[c];
            }
        }
    }
    for v in img.iter_mut() {
        // Box–Muller keeps the stream independent of rand_distr's algorithm choices.
        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
        *v += gain * noise * (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos();
    }
    img
}

/// Reads a file, decompressing it when its name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{} is not valid gzip", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The first of `names` (each also tried with `.gz`) that exists in `dir`.
fn find(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    for name in names {
        for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "{} has no {} (plain or .gz); download the data set's files into that folder",
        dir.display(),
        names.join(" or ")
    )
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// IDX images (magic 0x00000803): (count, rows, cols, pixels scaled to [0, 1]).
fn idx_images(path: &Path) -> Result<(usize, usize, usize, Vec<f32>)> {
    let b = read_maybe_gz(path)?;
    ensure!(
        b.len() >= 16,
        "{}: too short for an IDX image file",
        path.display()
    );
    ensure!(
        be_u32(&b, 0) == 0x803,
        "{}: not an IDX image file (magic {:#010x}, expected 0x00000803)",
        path.display(),
        be_u32(&b, 0)
    );
    let (n, rows, cols) = (
        be_u32(&b, 4) as usize,
        be_u32(&b, 8) as usize,
        be_u32(&b, 12) as usize,
    );
    ensure!(
        b.len() == 16 + n * rows * cols,
        "{}: header says {n} images of {rows}x{cols} ({} bytes) but the file has {} bytes after the header",
        path.display(),
        n * rows * cols,
        b.len() - 16
    );
    Ok((
        n,
        rows,
        cols,
        b[16..].iter().map(|&v| v as f32 / 255.0).collect(),
    ))
}

/// IDX labels (magic 0x00000801), each below `classes`.
fn idx_labels(path: &Path, classes: u8) -> Result<Vec<u8>> {
    let b = read_maybe_gz(path)?;
    ensure!(
        b.len() >= 8,
        "{}: too short for an IDX label file",
        path.display()
    );
    ensure!(
        be_u32(&b, 0) == 0x801,
        "{}: not an IDX label file (magic {:#010x}, expected 0x00000801)",
        path.display(),
        be_u32(&b, 0)
    );
    let n = be_u32(&b, 4) as usize;
    ensure!(
        b.len() == 8 + n,
        "{}: header says {n} labels but the file has {}",
        path.display(),
        b.len() - 8
    );
    if let Some(bad) = b[8..].iter().find(|&&l| l >= classes) {
        bail!(
            "{}: label {bad} is out of range 0..{classes}",
            path.display()
        );
    }
    Ok(b[8..].to_vec())
}

/// MNIST or Fashion-MNIST from the standard IDX file names in `dir`.
pub fn mnist(dir: &Path) -> Result<Dataset> {
    ensure!(
        dir.is_dir(),
        "--dataset mnist:{}: no such folder",
        dir.display()
    );
    let split = |img: &str, lbl: &str| -> Result<(usize, usize, Split)> {
        let (n, rows, cols, images) = idx_images(&find(dir, &[img])?)?;
        let labels = idx_labels(&find(dir, &[lbl])?, 10)?;
        ensure!(
            labels.len() == n,
            "{}: {n} images but {} labels",
            dir.display(),
            labels.len()
        );
        Ok((rows, cols, Split { images, labels }))
    };
    let (h, w, train) = split("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let (th, tw, test) = split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    ensure!(
        (h, w) == (th, tw),
        "{}: train images are {h}x{w} but test images {th}x{tw}",
        dir.display()
    );
    Ok(Dataset {
        channels: 1,
        height: h,
        width: w,
        classes: 10,
        train,
        test,
    })
}

/// CIFAR-10 binary batches (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`) in `dir`
/// or in its `cifar-10-batches-bin` subfolder.
pub fn cifar10(dir: &Path) -> Result<Dataset> {
    ensure!(
        dir.is_dir(),
        "--dataset cifar10:{}: no such folder",
        dir.display()
    );
    let nested = dir.join("cifar-10-batches-bin");
    let dir = if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    };
    const RECORD: usize = 1 + 3 * 32 * 32;
    let read = |names: &[String]| -> Result<Split> {
        let mut split = Split {
            images: Vec::new(),
            labels: Vec::new(),
        };
        for name in names {
            let path = find(&dir, &[name.as_str()])?;
            let b = read_maybe_gz(&path)?;
            ensure!(
                !b.is_empty() && b.len() % RECORD == 0,
                "{}: {} bytes is not a whole number of {RECORD}-byte CIFAR-10 records",
                path.display(),
                b.len()
            );
            for rec in b.chunks(RECORD) {
                ensure!(
                    rec[0] < 10,
                    "{}: label {} is out of range 0..10",
                    path.display(),
                    rec[0]
                );
                split.labels.push(rec[0]);
                split
                    .images
                    .extend(rec[1..].iter().map(|&v| v as f32 / 255.0));
            }
        }
        Ok(split)
    };
    let train_names: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
    Ok(Dataset {
        channels: 3,
        height: 32,
        width: 32,
        classes: 10,
        train: read(&train_names)?,
        test: read(&["test_batch.bin".to_string()])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_balanced() {
        let cfg = SyntheticConfig {
            train: 40,
            test: 20,
            size: 16,
            seed: 3,
            ..Default::default()
        };
        let (a, b) = (synthetic(cfg), synthetic(cfg));
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.train.images.len(), 40 * 3 * 16 * 16);
        for class in 0..10u8 {
            assert_eq!(a.train.labels.iter().filter(|&&l| l == class).count(), 4);
        }
        let c = synthetic(SyntheticConfig { seed: 4, ..cfg });
        assert_ne!(a.train.images, c.train.images);
        let twenty = synthetic(SyntheticConfig { classes: 20, ..cfg });
        assert_eq!(twenty.classes, 20);
        for class in 0..20u8 {
            assert_eq!(
                twenty.train.labels.iter().filter(|&&l| l == class).count(),
                2
            );
        }
    }

    /// One-way ANOVA F statistic of `values` grouped by `labels` (about 1 when the groups do
    /// not differ).
    fn f_statistic(values: &[f64], labels: &[u8], groups: usize) -> f64 {
        let n = values.len() as f64;
        let grand = values.iter().sum::<f64>() / n;
        let (mut sum, mut count) = (vec![0f64; groups], vec![0f64; groups]);
        for (v, &l) in values.iter().zip(labels) {
            sum[l as usize] += v;
            count[l as usize] += 1.0;
        }
        let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, c)| s / c).collect();
        let between: f64 = mean
            .iter()
            .zip(&count)
            .map(|(m, c)| c * (m - grand).powi(2))
            .sum();
        let within: f64 = values
            .iter()
            .zip(labels)
            .map(|(v, &l)| (v - mean[l as usize]).powi(2))
            .sum();
        (between / (groups - 1) as f64) / (within / (n - groups as f64))
    }

    #[test]
    fn colour_statistics_do_not_reveal_the_class() {
        // Per-image mean and spread of every channel: their class means differ no more than
        // chance allows (F < 3, p ≈ 0.002 for 9 and 1990 degrees of freedom).
        let ds = synthetic(SyntheticConfig {
            train: 2000,
            test: 10,
            size: 16,
            seed: 1,
            ..Default::default()
        });
        let plane = 16 * 16;
        for c in 0..3 {
            let (mut means, mut spreads) = (Vec::new(), Vec::new());
            for img in ds.train.images.chunks(3 * plane) {
                let ch: Vec<f64> = img[c * plane..(c + 1) * plane]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let m = ch.iter().sum::<f64>() / plane as f64;
                means.push(m);
                spreads
                    .push((ch.iter().map(|v| (v - m).powi(2)).sum::<f64>() / plane as f64).sqrt());
            }
            for (what, values) in [("mean", &means), ("spread", &spreads)] {
                let f = f_statistic(values, &ds.train.labels, 10);
                assert!(f < 3.0, "channel {c} {what}: F = {f}");
            }
        }
        // The same statistic does see the class in the orientation it is made of.
        let orientation: Vec<f64> = ds
            .train
            .images
            .chunks(3 * plane)
            .map(|img| {
                let px = |x: usize, y: usize| img[y * 16 + x] as f64;
                let (mut h, mut v) = (0.0, 0.0);
                for y in 0..15 {
                    for x in 0..15 {
                        h += (px(x + 1, y) - px(x, y)).abs();
                        v += (px(x, y + 1) - px(x, y)).abs();
                    }
                }
                h / (h + v)
            })
            .collect();
        assert!(f_statistic(&orientation, &ds.train.labels, 10) > 10.0);
    }

    #[test]
    fn standardize_gives_zero_mean_unit_variance_per_channel() {
        let ds = DatasetSpec::Synthetic(SyntheticConfig {
            train: 100,
            test: 10,
            size: 8,
            seed: 0,
            ..Default::default()
        })
        .load()
        .unwrap();
        let plane = 64;
        for c in 0..3 {
            let vals: Vec<f64> = ds
                .train
                .images
                .chunks(plane)
                .skip(c)
                .step_by(3)
                .flatten()
                .map(|&v| v as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!(
                mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
                "channel {c}: {mean} {var}"
            );
        }
    }

    #[test]
    fn difficulty_keys_print_only_where_they_differ_and_round_trip() {
        let default: DatasetSpec = "synthetic".parse().unwrap();
        assert_eq!(
            default.to_string(),
            "synthetic:train=6000,test=2000,size=16,seed=0"
        );
        let hard: DatasetSpec = "synthetic:jitter=10,exposure=1.5,envelope=1.6,contrast=1"
            .parse()
            .unwrap();
        let text = hard.to_string();
        assert_eq!(
            text,
            "synthetic:train=6000,test=2000,size=16,seed=0,jitter=10,exposure=1.5,envelope=1.6,contrast=1"
        );
        assert_eq!(text.parse::<DatasetSpec>().unwrap(), hard);
        let many: DatasetSpec = "synthetic:classes=20".parse().unwrap();
        assert_eq!(
            many.to_string(),
            "synthetic:train=6000,test=2000,size=16,seed=0,classes=20"
        );
        assert_eq!(many.shape().2, 20);
    }

    #[test]
    fn difficulty_keys_change_the_images_they_should() {
        let base = SyntheticConfig {
            train: 50,
            test: 1,
            ..Default::default()
        };
        let spread = |cfg: SyntheticConfig| {
            // Per-image mean brightness: exposure spreads it.
            let ds = synthetic(cfg);
            let means: Vec<f64> = ds
                .train
                .images
                .chunks(ds.image_len())
                .map(|im| im.iter().map(|&v| v as f64).sum::<f64>() / im.len() as f64)
                .collect();
            let m = means.iter().sum::<f64>() / means.len() as f64;
            (means.iter().map(|v| (v - m).powi(2)).sum::<f64>() / means.len() as f64).sqrt()
        };
        assert!(
            spread(SyntheticConfig {
                exposure: 1.5,
                ..base
            }) > 1.5 * spread(base)
        );
        let same = SyntheticConfig {
            jitter: 4.0,
            exposure: 0.5,
            envelope: 1.0,
            contrast: 0.5,
            ..base
        };
        assert_eq!(synthetic(same).train.images, synthetic(base).train.images);
        let wider = synthetic(SyntheticConfig {
            envelope: 1.6,
            ..base
        });
        assert_ne!(wider.train.images, synthetic(base).train.images);
    }

    #[test]
    fn dataset_specs_parse_and_reject_bad_input() {
        assert_eq!(
            "synthetic:train=100,size=32"
                .parse::<DatasetSpec>()
                .unwrap(),
            DatasetSpec::Synthetic(SyntheticConfig {
                train: 100,
                size: 32,
                ..Default::default()
            })
        );
        for (bad, msg) in [
            ("imagenet", "unknown data set"),
            ("mnist", "needs a folder"),
            ("synthetic:train=x", "not a whole number"),
            ("synthetic:depth=3", "unknown --dataset option"),
            ("synthetic:size=4", "out of range"),
            ("synthetic:jitter=50", "out of range"),
            ("synthetic:classes=1", "out of range"),
            ("synthetic:classes=91", "out of range"),
            ("synthetic:exposure=-1", "out of range"),
            ("synthetic:contrast=x", "not a number"),
        ] {
            let e = bad.parse::<DatasetSpec>().unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}
