//! `bench-norms`: normbench's fused normalizers against their reference twins and candle-nn's
//! own layers, printed as markdown tables with speed-ups, effective bandwidth against a copy of
//! the same size, and peak extra memory.

use crate::bench_layer::{fwd_bwd, time_layer, Layer};
use crate::bench_sample_norms::{table as sample_table, SAMPLE_NORMS};
use crate::timing::{measure, median};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use normalizers::kernels::{fused_backward, fused_normalize, lean_keeps_stats, Sets};
use rayon::prelude::*;
use std::path::PathBuf;
use std::process::Command;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Thread counts for the kernels (and candle's own ops): a table for each, then the fused
    /// kernels' scaling over the first.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Shapes N,C,H,W separated by `;` [default: the five shapes of the kernels issue].
    #[arg(long)]
    shapes: Option<String>,
    /// Normalizers to time: bn, gn, ln, in (against candle-nn) and rms, frn, evonorm-s0
    /// (against the same layer composed of candle ops).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bn,gn,ln,in,rms,frn,evonorm-s0"
    )]
    norms: Vec<String>,
    /// Minimum measuring time per cell, in seconds.
    #[arg(long, default_value_t = 0.3)]
    min_time: f64,
    /// Leave out the reference twin (slow on the large shapes).
    #[arg(long)]
    no_reference: bool,
    /// Runs of each thread count for the scaling table, alternating (1, 2, 1, 2, …): its ratios
    /// are medians over rounds of one round's ratio, so that the machine's drift between
    /// processes minutes apart counts less. The other tables come from the first round.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Time only the fused kernels and print nothing (the later rounds of a run for several
    /// thread counts).
    #[arg(long, hide = true)]
    fused_only: bool,
    /// Where a run for one thread count, started by a run for several, leaves its fused
    /// kernels' times (JSON).
    #[arg(long, hide = true)]
    times_out: Option<PathBuf>,
}

const DEFAULT_SHAPES: [[usize; 4]; 5] = [
    [2, 64, 56, 56],
    [32, 64, 56, 56],
    [32, 256, 14, 14],
    [8, 512, 7, 7],
    [32, 32, 32, 32],
];

/// GroupNorm's groups in every implementation timed.
const GN_GROUPS: usize = 32;

/// The spec bench-norms builds for a normalizer name, and the sets its kernel normalizes over.
fn spec_and_sets(norm: &str, c: usize) -> Result<(String, Sets)> {
    Ok(match norm {
        "bn" => ("bn".into(), Sets::Channels),
        "gn" => (format!("gn:groups={GN_GROUPS}"), Sets::Groups(GN_GROUPS)),
        "ln" => ("ln".into(), Sets::Groups(1)),
        "in" => ("in".into(), Sets::Groups(c)),
        other => bail!(
            "unknown normalizer {other:?} for bench-norms; use bn, gn, ln, in, rms, frn, evonorm-s0"
        ),
    })
}

fn build(kind: &str, norm: &str, c: usize, vb: VarBuilder) -> Result<Layer> {
    let (spec, _) = spec_and_sets(norm, c)?;
    Ok(match (kind, norm) {
        ("fused", _) => Layer::Normbench(normalizers::from_spec(&spec, c, vb)?),
        ("reference", _) => Layer::Normbench(normalizers::from_spec(
            &format!(
                "{spec}{}impl=reference",
                if spec.contains(':') { ',' } else { ':' }
            ),
            c,
            vb,
        )?),
        ("candle-nn", "bn") => Layer::CandleBatch(candle_nn::batch_norm(
            c,
            candle_nn::BatchNormConfig::default(),
            vb,
        )?),
        ("candle-nn", "gn") => Layer::CandleGroup(candle_nn::group_norm(GN_GROUPS, c, 1e-5, vb)?),
        ("candle-nn", "in") => Layer::CandleGroup(candle_nn::group_norm(c, c, 1e-5, vb)?),
        ("candle-nn", _) => Layer::ComposedLn {
            weight: vb.get_with_hints(c, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", candle_nn::Init::Const(0.0))?,
        },
        _ => Layer::Identity,
    })
}

/// Bytes per second of copying a tensor of `n` f32 values (read once, written once), with the
/// current pool's threads each copying a contiguous share.
fn copy_bandwidth(n: usize, min_time: f64) -> Result<f64> {
    let src = vec![1f32; n];
    let mut dst = vec![0f32; n];
    let share = n.div_ceil(rayon::current_num_threads());
    let (t, _) = measure(min_time, || {
        dst.par_chunks_mut(share)
            .zip(std::hint::black_box(&src).par_chunks(share))
            .for_each(|(d, s)| d.copy_from_slice(s));
        std::hint::black_box(&mut dst);
        Ok(())
    })?;
    Ok(2.0 * 4.0 * n as f64 / t)
}

/// Median seconds and peak memory of the fused backward kernel on its own (no autograd),
/// output gradient `dy`, with the statistics as training keeps them: BatchNorm's always (it
/// updates running statistics), the others' where the lean forward keeps them (else the
/// backward recomputes them).
fn backward_alone(norm: &str, x: &Var, dy: &Tensor, min_time: f64) -> Result<(f64, usize)> {
    let c = x.dim(1)?;
    let (_, sets) = spec_and_sets(norm, c)?;
    let x = x.as_tensor().detach();
    let (w, b) = (
        Tensor::ones(c, DType::F32, &Device::Cpu)?,
        Tensor::zeros(c, DType::F32, &Device::Cpu)?,
    );
    let (_, stats) = fused_normalize(&x, &w, &b, sets, 1e-5)?;
    let kept = (sets == Sets::Channels || lean_keeps_stats(x.dims(), sets, DType::F32)?)
        .then_some(&*stats);
    measure(min_time, || {
        fused_backward(&x, &w, dy, sets, kept, 1e-5)?;
        Ok(())
    })
}

fn parse_shapes(shapes: &Option<String>) -> Result<Vec<[usize; 4]>> {
    let Some(s) = shapes else {
        return Ok(DEFAULT_SHAPES.to_vec());
    };
    s.split(';')
        .map(|shape| {
            let dims: Vec<usize> = shape
                .split(',')
                .map(|d| d.trim().parse())
                .collect::<std::result::Result<_, _>>()?;
            match dims[..] {
                [n, c, h, w] if n * c * h * w > 0 => Ok([n, c, h, w]),
                _ => bail!("--shapes: {shape:?} is not N,C,H,W with sizes above 0"),
            }
        })
        .collect()
}

/// The fused kernels' times for one normalizer and shape: forward, backward alone and
/// forward+backward net.
type FusedTimes = Vec<((String, [usize; 4]), [f64; 3])>;

pub fn run(args: BenchArgs) -> Result<()> {
    let shapes = parse_shapes(&args.shapes)?;
    if args.threads.is_empty() || args.threads.contains(&0) {
        bail!("--threads: give thread counts above 0, e.g. --threads 1,2");
    }
    if args.rounds == 0 {
        bail!("--rounds: give 1 or more");
    }
    if args.rounds > 1 && args.threads.len() < 2 {
        bail!(
            "--rounds: the rounds alternate thread counts; give several, e.g. --threads 1,2 \
             --rounds 3"
        );
    }
    if let [threads] = args.threads[..] {
        let times = with_threads(threads, || tables(&args, &shapes, threads))?;
        if let Some(path) = &args.times_out {
            std::fs::write(path, serde_json::to_string(&times)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(());
    }
    // candle sizes the thread pool of its elementwise ops once per process, so each thread
    // count runs in a process of its own; rounds alternate them.
    let dir = tempfile::tempdir()?;
    // The fused kernels' times of each round, for each thread count.
    let mut fused: Vec<(usize, Vec<FusedTimes>)> =
        args.threads.iter().map(|&t| (t, Vec::new())).collect();
    for round in 0..args.rounds {
        for (threads, rounds) in &mut fused {
            let out = dir.path().join(format!("times-{threads}-{round}.json"));
            let mut child = Command::new(std::env::current_exe()?);
            child
                .args(["bench-norms", "--threads", &threads.to_string()])
                .args(["--shapes", &shapes_arg(&shapes)])
                .args(["--norms", &args.norms.join(",")])
                .args(["--min-time", &args.min_time.to_string()])
                .arg("--times-out")
                .arg(&out);
            if args.no_reference {
                child.arg("--no-reference");
            }
            if round > 0 {
                child.arg("--fused-only");
            }
            let status = child.status().context("cannot start a benchmark process")?;
            if !status.success() {
                bail!("the benchmark with {threads} thread(s) failed ({status})");
            }
            let times = std::fs::read_to_string(&out)
                .with_context(|| format!("the {threads}-thread run left no times"))?;
            rounds.push(serde_json::from_str(&times)?);
        }
    }
    print_scaling(&fused);
    Ok(())
}

/// The scaling table: for each further thread count, each cell's ratio to the first thread
/// count, the median over rounds of one round's ratio (with the range where there are several).
fn print_scaling(fused: &[(usize, Vec<FusedTimes>)]) {
    let [(base_threads, base), rest @ ..] = fused else {
        return;
    };
    if rest.is_empty() {
        return;
    }
    let rounds = base.len();
    let over = if rounds > 1 {
        format!(" (median of {rounds} rounds' ratios, with their range)")
    } else {
        String::new()
    };
    println!("### Scaling of the fused kernels over {base_threads} thread(s){over}\n");
    let mut header = "| norm | shape |".to_string();
    let mut rule = "|---|---|".to_string();
    for (threads, _) in rest {
        header += &format!(
            " fwd ×, {threads} threads | bwd alone ×, {threads} threads | fwd+bwd net ×, {threads} threads |"
        );
        rule += "---:|---:|---:|";
    }
    println!("{header}\n{rule}");
    for (i, ((norm, shape), _)) in base[0].iter().enumerate() {
        let mut row = format!("| {norm} | {shape:?} |");
        for (_, times) in rest {
            for k in 0..3 {
                let ratios: Vec<f64> = (0..rounds)
                    .map(|r| base[r][i].1[k] / times[r][i].1[k])
                    .collect();
                let (lo, hi) = ratios
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                row += &if rounds > 1 {
                    format!(" {:.2}× ({lo:.2}–{hi:.2}) |", median(ratios))
                } else {
                    format!(" {:.2}× |", median(ratios))
                };
            }
        }
        println!("{row}");
    }
    println!();
}

/// Runs `f` with `threads` threads for the fused kernels (a rayon pool) and for candle's own
/// ops (which read `RAYON_NUM_THREADS` when they first run).
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(f)
}

/// `shapes` as `--shapes` takes them.
fn shapes_arg(shapes: &[[usize; 4]]) -> String {
    let each: Vec<String> = shapes
        .iter()
        .map(|s| s.map(|d| d.to_string()).join(","))
        .collect();
    each.join(";")
}

/// The names among `--norms` timed against candle-nn (with the backward kernel alone and the
/// scaling table), and those timed against their composed twin; an unknown name is an error.
fn split_norms(norms: &[String]) -> Result<(Vec<&String>, Vec<&str>)> {
    let (sample, classic): (Vec<&String>, Vec<&String>) = norms
        .iter()
        .partition(|n| SAMPLE_NORMS.contains(&n.as_str()));
    for norm in &classic {
        spec_and_sets(norm, 32)?;
    }
    Ok((classic, sample.into_iter().map(|s| s.as_str()).collect()))
}

/// The fused kernels' times alone, as `tables` measures them, printing nothing.
fn fused_times(args: &BenchArgs, shapes: &[[usize; 4]]) -> Result<FusedTimes> {
    let mut fused = Vec::new();
    let (classic, _) = split_norms(&args.norms)?;
    for shape in shapes {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?)?;
        let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?;
        for norm in classic.iter().copied() {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let t = time_layer(&build("fused", norm, shape[1], vb)?, &x, &r, args.min_time)?;
            let (bwd, _) = backward_alone(norm, &x, &r, args.min_time)?;
            fused.push(((norm.clone(), *shape), [t.fwd, bwd, t.net]));
        }
    }
    Ok(fused)
}

/// Prints the tables for one thread count (run inside a pool of that size); returns the fused
/// kernels' times.
fn tables(args: &BenchArgs, shapes: &[[usize; 4]], threads: usize) -> Result<FusedTimes> {
    if args.fused_only {
        return fused_times(args, shapes);
    }
    let (classic, sample) = split_norms(&args.norms)?;
    let mut fused = Vec::new();
    if !classic.is_empty() {
        classic_tables(args, &classic, shapes, threads, &mut fused)?;
    }
    sample_table(&sample, shapes, args.min_time, threads)?;
    Ok(fused)
}

/// The table of bn, gn, ln, in (`classic`) against their reference twins and candle-nn, a
/// section per shape; the fused kernels' times go to `fused` for the scaling table.
fn classic_tables(
    args: &BenchArgs,
    classic: &[&String],
    shapes: &[[usize; 4]],
    threads: usize,
    fused: &mut FusedTimes,
) -> Result<()> {
    println!(
        "## Normalization layers, training forward and forward+backward, {threads} thread(s)\n"
    );
    println!(
        "f32, NCHW, {threads} thread(s). Forward+backward is `(y * r).sum_all()?.backward()` through candle's \
         autograd, less the same harness on an identity layer (\"net\": the median of paired \
         differences, the two calls alternating; memory likewise). GB/s counts the bytes the bound says each pass must move (bn forward: \
         read x twice, write y; gn/ln/in forward: read x, write y; backward: read x and dy twice, write \
         dx) against a copy of the same size with the same threads, measured now. Memory is the peak allocated above the \
         inputs, as a multiple of the input's size.\n"
    );
    let mut kinds = vec!["fused"];
    if !args.no_reference {
        kinds.push("reference");
    }
    kinds.push("candle-nn");
    for shape in shapes {
        let n: usize = shape.iter().product();
        let bytes = 4.0 * n as f64;
        let bandwidth = copy_bandwidth(n, args.min_time)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?)?;
        let r = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu)?;
        let (harness, harness_mem) = measure(args.min_time, || fwd_bwd(&Layer::Identity, &x, &r))?;
        println!(
            "### shape {shape:?} ({:.1} MB; copy bandwidth {:.1} GB/s; harness {:.2} ms, {:.1}× input)\n",
            bytes / 1e6,
            bandwidth / 1e9,
            harness * 1e3,
            harness_mem as f64 / bytes
        );
        println!("| norm | impl | fwd (ms) | bwd alone (ms) | fwd+bwd net (ms) | fwd+bwd speed-up vs candle-nn | fwd GB/s | fwd+bwd GB/s | % of copy bandwidth (fwd, bwd alone, fwd+bwd) | peak mem fwd, bwd alone, fwd+bwd net (× input) |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for norm in classic.iter().copied() {
            let mut rows = Vec::new();
            for kind in &kinds {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
                let layer = build(kind, norm, shape[1], vb)?;
                rows.push((kind, time_layer(&layer, &x, &r, args.min_time)?));
            }
            let candle = rows
                .iter()
                .find(|(k, _)| **k == "candle-nn")
                .map(|(_, t)| t.net);
            let fwd_bytes = if norm == "bn" { 3.0 } else { 2.0 } * bytes;
            let bwd_bytes = 5.0 * bytes;
            for (kind, t) in rows {
                let (gbs_f, gbs_fb) = (fwd_bytes / t.fwd, (fwd_bytes + bwd_bytes) / t.net);
                let bwd = if *kind == "fused" {
                    let (bwd, mem) = backward_alone(norm, &x, &r, args.min_time)?;
                    fused.push(((norm.clone(), *shape), [t.fwd, bwd, t.net]));
                    Some((bwd, mem))
                } else {
                    None
                };
                println!(
                    "| {norm} | {kind} | {:.2} | {} | {:.2} | {} | {:.1} | {:.1} | {:.0}%, {}, {:.0}% | {:.1}, {}, {:.1} |",
                    t.fwd * 1e3,
                    bwd.map_or("–".into(), |(b, _)| format!("{:.2}", b * 1e3)),
                    t.net * 1e3,
                    candle.map_or("–".into(), |c| format!("{:.1}×", c / t.net)),
                    gbs_f / 1e9,
                    gbs_fb / 1e9,
                    100.0 * gbs_f / bandwidth,
                    bwd.map_or("–".into(), |(b, _)| format!("{:.0}%", 100.0 * bwd_bytes / b / bandwidth)),
                    100.0 * gbs_fb / bandwidth,
                    t.mem_fwd as f64 / bytes,
                    bwd.map_or("–".into(), |(_, m)| format!("{:.1}", m as f64 / bytes)),
                    t.mem_net as f64 / bytes,
                );
            }
        }
        println!();
    }
    Ok(())
}
