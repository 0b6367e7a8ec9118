//! normbench's experiment runner. See `experiments --help`.

mod alloc;
mod bench_cases;
mod bench_conv;
mod bench_layer;
mod bench_norms;
mod bench_sample_norms;
mod bench_torch;
mod bench_train;
mod curves;
mod data;
mod manifest;
mod model;
mod optim;
mod options;
mod plot;
mod plot_vary;
mod report;
mod report_vary;
mod results;
mod summary;
mod sweep;
mod timing;
mod train;
mod vary;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(
    name = "experiments",
    version,
    about = "Normalizer × batch size × seed sweeps that reproduce BatchNorm's small-batch \
             degradation (Wu & He 2018, Figure 1), with reports and benchmarks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train and evaluate every normalizer × batch size × seed; write CSVs, tables and a figure.
    #[command(after_help = SWEEP_EXAMPLES)]
    Sweep(SweepArgs),
    /// Combine the folders of a sharded sweep into one and rebuild its reports.
    #[command(
        after_help = "Example:\n  experiments merge --out results/sweep-1a2b3c4d results/sweep-1a2b3c4d/shard-*"
    )]
    Merge {
        /// The combined sweep folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Shard folders written by `sweep --shard i/n`.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
    /// Rebuild summary.csv, summary.md, summary.tex and the figure from a sweep's runs.csv.
    #[command(after_help = "Example:\n  experiments report results/reference")]
    Report {
        /// The sweep folder.
        dir: PathBuf,
        /// The test error (%) of the convergence table [default: per batch size and setting,
        /// the worst normalizer's final mean error, rounded up].
        #[arg(long)]
        target_error: Option<f64>,
    },
    /// Draw training loss and test error per epoch from a sweep's epochs.csv, a line per
    /// normalizer, at one batch size (and the varied settings that --where leaves).
    #[command(
        after_help = "Example:\n  experiments curves results/claims/learning-rate --where base-lr=0.1"
    )]
    Curves(curves::CurvesArgs),
    /// Time the fast convolution against candle's conv2d on the model's layers.
    BenchConv(bench_conv::BenchArgs),
    /// Time the fused normalizers against their reference twins and candle-nn's layers.
    BenchNorms(bench_norms::BenchArgs),
    /// Where a training step's time goes: the whole step per image, its convolutions, its
    /// normalizers and the rest, per normalizer and batch size.
    BenchTrain(bench_train::BenchArgs),
}

const SWEEP_EXAMPLES: &str = "Examples:
  experiments sweep                                   # the default sweep (the reference run)
  experiments sweep --quick                           # a smoke test, under a minute
  experiments sweep --norms bn,gn:groups=4 --seeds 0 --batch-sizes 32,2
  experiments sweep --dataset mnist:data/mnist --epochs 3
  experiments sweep --norms none,bn,gn,ln --batch-sizes 32 --vary base-lr=0.1,0.4,1.6
  experiments sweep --shard 2/4 --out results/big/shard-2   # one of four machines
  experiments sweep --devices 8 --batch-sizes 32,8,2  # B per device, as on the paper's 8 GPUs";

#[derive(Args, Debug)]
struct SweepArgs {
    /// Comma-separated normalizer specs [default: bn,gn:groups=G,ln,in, G the model's groups].
    #[arg(long)]
    norms: Option<String>,
    /// Comma-separated batch sizes per step, or per device with --devices [default:
    /// 32,16,8,4,2].
    #[arg(long, value_delimiter = ',')]
    batch_sizes: Option<Vec<usize>>,
    /// Comma-separated seeds [default: 0,1,2].
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Training epochs, the same at every batch size [default: 6].
    #[arg(long)]
    epochs: Option<usize>,
    /// Learning rate at 32 images per step; a step of N images trains with base-lr·N/32.
    #[arg(long, default_value_t = 0.1)]
    base_lr: f64,
    /// Simulated devices: each step takes one batch of the batch size per device, and
    /// BatchNorm-like layers take their statistics over each device's batch alone (no
    /// synchronized BatchNorm; the GroupNorm paper trains on 8).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// Linear warm-up, in epochs, before the cosine decay (at most --epochs) [default: 3, or
    /// --epochs if fewer (the fewest of --vary epochs)].
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Weight decay on convolution and classifier weights (never on normalizers).
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// synthetic[:train=N,test=N,size=S,seed=K,classes=K,jitter=D,exposure=E,envelope=F,
    /// contrast=C],
    /// mnist:DIR (IDX files) or cifar10:DIR (binary batches) [default: synthetic].
    #[arg(long)]
    dataset: Option<String>,
    /// resnet[:width=W,blocks=B,stages=N,groups=G,stem=S,dropout=P,init-gain=K,ws=true].
    #[arg(long, default_value = "resnet")]
    model: String,
    /// Convolution: fast (im2col + matmul with its own backward) or candle (candle's conv2d).
    #[arg(long, default_value = "fast")]
    conv: String,
    /// The sweep folder [default: results/<sweep-id>/, or its shard-i-of-n/ with --shard].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs trained at once [default: the number of CPUs].
    #[arg(long)]
    jobs: Option<usize>,
    /// Run the i-th of n interleaved shares of the runs (1 <= i <= n); combine with `merge`.
    #[arg(long)]
    shard: Option<String>,
    /// Preset for a smoke test: tiny data, one epoch, bn and gn at batch sizes 8 and 2, seed 0.
    #[arg(long)]
    quick: bool,
    /// Print a line per epoch.
    #[arg(long)]
    verbose: bool,
    /// Add a setting as an axis of the grid: KEY=V1,V2,... (repeatable); KEY is one of base-lr,
    /// weight-decay, epochs, warmup-epochs, dropout, init-gain, momentum, devices.
    #[arg(long, value_name = "KEY=V1,V2,...")]
    vary: Vec<String>,
    /// Train again the runs that diverged in an earlier attempt (kept as results otherwise).
    #[arg(long)]
    retry_diverged: bool,
}

/// Bytes of memory the OS says are available, where it says (Linux's MemAvailable).
fn available_memory() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn sweep(args: SweepArgs) -> Result<()> {
    let q = args.quick;
    let model: model::ModelConfig = args.model.parse()?;
    let dataset: data::DatasetSpec = args
        .dataset
        .as_deref()
        .unwrap_or(if q {
            "synthetic:train=512,test=250"
        } else {
            "synthetic"
        })
        .parse()?;
    let default_norms = if q {
        format!("bn,gn:groups={}", model.groups)
    } else {
        format!("bn,gn:groups={},ln,in", model.groups)
    };
    let epochs = args.epochs.unwrap_or(if q { 1 } else { 6 });
    let vary = vary::parse(&args.vary)?;
    // The default warm-up fits the shortest run, whichever sets the epochs.
    let fewest_epochs = vary
        .iter()
        .find(|a| a.key == "epochs")
        .and_then(|a| {
            a.values
                .iter()
                .filter_map(|v| v.parse::<usize>().ok())
                .min()
        })
        .unwrap_or(epochs);
    let plan = sweep::Plan {
        norms: sweep::parse_norms(
            args.norms.as_deref().unwrap_or(&default_norms),
            model.groups,
        )?,
        batch_sizes: args.batch_sizes.unwrap_or_else(|| {
            if q {
                vec![8, 2]
            } else {
                vec![32, 16, 8, 4, 2]
            }
        }),
        seeds: args
            .seeds
            .unwrap_or_else(|| if q { vec![0] } else { vec![0, 1, 2] }),
        dataset,
        train: train::TrainConfig {
            model: model.to_string(),
            epochs,
            base_lr: args.base_lr,
            warmup_epochs: args.warmup_epochs.unwrap_or(3f64.min(fewest_epochs as f64)),
            momentum: 0.9,
            weight_decay: args.weight_decay,
            large_eval_batch: 250,
            conv: args.conv.parse::<conv::ConvImpl>()?.to_string(),
            devices: args.devices,
        },
        vary,
        shard: args.shard.as_deref().map(sweep::parse_shard).transpose()?,
    };
    let out = args.out.unwrap_or_else(|| {
        let dir = PathBuf::from("results").join(plan.id());
        match plan.shard {
            Some((i, n)) => dir.join(format!("shard-{i}-of-{n}")),
            None => dir,
        }
    });
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    anyhow::ensure!(
        jobs >= 1,
        "--jobs 0 runs nothing; give at least 1 (default: the number of CPUs)"
    );
    if let Some(bytes) = available_memory() {
        plan.check_memory(jobs.min(plan.runs().len().max(1)), bytes)?;
    }
    let ds = plan
        .dataset
        .load()
        .with_context(|| format!("cannot load --dataset {}", plan.dataset))?;
    sweep::run(&plan, ds, &out, jobs, args.verbose, args.retry_diverged)
}

/// candle runs its elementwise ops on a thread pool of its own, whose idle workers spin 25,000
/// times before they sleep; normbench's kernels run on rayon's pool. With as many threads as
/// cores, candle's spinning workers take the cores the kernels need: through autograd, two
/// threads ran the fused layers at (32,256,14,14) 1.2–1.3× faster than one instead of 1.9–2.2×.
/// So they sleep almost at once, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise.
/// (Runs with one thread have no such workers.) Called first, before any thread starts.
fn quiet_candle_pool() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

fn main() -> Result<()> {
    alloc::keep_freed_memory();
    quiet_candle_pool();
    match Cli::parse().command {
        Command::Sweep(args) => sweep(args),
        Command::Merge { out, shards } => sweep::merge(&out, &shards),
        Command::Report { dir, target_error } => {
            anyhow::ensure!(
                dir.is_dir(),
                "{} is not a folder; give a sweep folder (experiments report results/reference)",
                dir.display()
            );
            if let Some(t) = target_error {
                anyhow::ensure!(
                    (0.0..=100.0).contains(&t),
                    "--target-error {t} is not a percentage; give a test error in [0, 100]"
                );
            }
            let _lock = results::lock_folder(&dir)?;
            report::report(&dir, target_error)
                .map(|_| eprintln!("wrote the reports of {}", dir.display()))
        }
        Command::Curves(args) => curves::run(args),
        Command::BenchConv(args) => bench_conv::run(args),
        Command::BenchNorms(args) => bench_norms::run(args),
        Command::BenchTrain(args) => bench_train::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sweep_help_names_every_key_vary_takes() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("sweep")
            .expect("a sweep subcommand")
            .render_long_help()
            .to_string();
        let vary = &help[help.find("--vary <").expect("--vary in the help")..];
        let line: String = vary
            .split("--retry")
            .next()
            .unwrap_or(vary)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for (key, _) in vary::KEYS {
            assert!(line.contains(key), "--vary's help leaves out {key}: {line}");
        }
    }
}
