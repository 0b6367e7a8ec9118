//! Training curves from `epochs.csv`: training loss and test error per epoch, a line per
//! normalizer (mean over seeds) at one batch size, so that "converges faster" is something to
//! look at; and the table of epochs each needs to reach a target test error.

use crate::plot::{save_figure, COLORS};
use crate::results::{EpochRow, RunRow};
use crate::summary::{distinct_settings, mean_std, settings_of};
use crate::vary::{self, Setting};
use anyhow::{anyhow, ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// One line of the figure: its label, and per epoch the mean training loss and test error.
pub struct Curve {
    pub label: String,
    pub loss: Vec<(f64, f64)>,
    pub error: Vec<(f64, f64)>,
}

/// Whether `setting` has every `key=value` of `filter`.
fn matches(setting: &Setting, filter: &Setting) -> bool {
    filter.iter().all(|f| setting.contains(f))
}

/// The curves of each normalizer (and each varied setting that `filter` leaves) at batch size
/// `b`, averaged over seeds; epochs of diverged runs count until they diverged.
pub fn curves(epochs: &[EpochRow], norms: &[String], b: usize, filter: &Setting) -> Vec<Curve> {
    let at_b: Vec<&EpochRow> = epochs
        .iter()
        .filter(|e| e.batch_size == b && matches(&e.vary, filter))
        .collect();
    let settings = distinct_settings(at_b.iter().map(|e| &e.vary));
    let mut out = Vec::new();
    for setting in &settings {
        for norm in norms {
            let rows: Vec<&&EpochRow> = at_b
                .iter()
                .filter(|e| &e.norm == norm && &e.vary == setting)
                .collect();
            let last = rows.iter().map(|e| e.epoch).max().unwrap_or(0);
            let mean_at = |f: fn(&EpochRow) -> f64, epoch: usize| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|e| e.epoch == epoch)
                    .map(|e| f(e))
                    .collect();
                mean_std(&v).0
            };
            let (mut loss, mut error) = (Vec::new(), Vec::new());
            for epoch in 1..=last {
                let (l, e) = (
                    mean_at(|e| e.train_loss, epoch),
                    mean_at(|e| e.test_error, epoch),
                );
                if l.is_finite() && e.is_finite() {
                    loss.push((epoch as f64, l));
                    error.push((epoch as f64, e));
                }
            }
            if loss.is_empty() {
                continue;
            }
            let mut label = norm.clone();
            if settings.len() > 1 {
                let _ = write!(label, " {}", vary::label(setting));
            }
            out.push(Curve { label, loss, error });
        }
    }
    out
}

/// Writes `<stem>.svg` and `.png` into `dir`: training loss (left) and test error (right)
/// against the epoch.
pub fn figure(curves: &[Curve], title: &str, dir: &Path, stem: &str) -> Result<()> {
    ensure!(!curves.is_empty(), "no epochs to draw for {title}");
    save_figure!(dir, stem, (1200, 500), draw(curves, title))
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    curves: &[Curve],
    title: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the curves: {e:?}");
    area.fill(&WHITE).map_err(err)?;
    let area = area.titled(title, ("sans-serif", 20)).map_err(err)?;
    let halves = area.split_evenly((1, 2));
    let pick = [
        (|c: &Curve| &c.loss) as fn(&Curve) -> &Vec<(f64, f64)>,
        |c: &Curve| &c.error,
    ];
    for (half, (what, f)) in halves
        .into_iter()
        .zip(["training loss", "test error (%)"].into_iter().zip(pick))
    {
        draw_half(half, curves, what, f)?;
    }
    area.present().map_err(err)?;
    Ok(())
}

fn draw_half<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    curves: &[Curve],
    what: &str,
    f: fn(&Curve) -> &Vec<(f64, f64)>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the curves: {e:?}");
    let all = curves.iter().flat_map(|c| f(c).iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = all.map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&area)
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5..x_max + 0.5, 0.0..y_max.max(1e-3))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .y_desc(what)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, c) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(f(c).iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(f(c).iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The default target of a group of cells (one batch size and setting): the worst
/// normalizer's final mean test error, rounded up to a whole percent, so that every normalizer
/// reaches it on average by the last epoch and the table compares how soon.
fn group_target(runs: &[&RunRow]) -> Option<f64> {
    let owned: Vec<RunRow> = runs.iter().map(|r| (*r).clone()).collect();
    crate::summary::summarize(&owned, &[])
        .iter()
        .filter(|c| c.n > 0)
        .map(|c| c.test_error_mean)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        .map(f64::ceil)
}

/// The first epoch at which each run's test error is at most `target`, or None.
fn first_epoch(epochs: &[EpochRow], run: &RunRow, target: f64) -> Option<usize> {
    let key = run.key();
    epochs
        .iter()
        .filter(|e| e.key() == key && e.test_error <= target)
        .map(|e| e.epoch)
        .min()
}

/// One row of the convergence table: the mean first epoch at which `cell`'s runs reach
/// `target`% (over the runs that do) and how many never do (a diverged run never does).
fn convergence_row(epochs: &[EpochRow], cell: &[&RunRow], target: f64) -> (String, usize) {
    let reached: Vec<f64> = cell
        .iter()
        .filter(|r| !r.diverged)
        .filter_map(|r| first_epoch(epochs, r, target).map(|e| e as f64))
        .collect();
    let mean = if reached.is_empty() {
        "–".to_string()
    } else {
        format!("{:.1}", mean_std(&reached).0)
    };
    (mean, cell.len() - reached.len())
}

/// The markdown section: for each normalizer, batch size and setting, the epochs its runs take
/// to reach a target test error: `target`%, or by default each batch size and setting's worst
/// final mean error (see [`group_target`]).
pub fn convergence_table(
    runs: &[RunRow],
    epochs: &[EpochRow],
    norms: &[String],
    sizes: &[usize],
    target: Option<f64>,
) -> String {
    let mut s = String::from(
        "\nEpochs to reach a target test error (mean over the seeds that reach it; from \
         epochs.csv). The target: the worst normalizer's final mean error at that batch size \
         and setting, rounded up, unless `report --target-error` gives one.\n\n\
         | normalizer | batch size | setting | target (%) | epochs to target | never |\n\
         |---|---:|---|---:|---:|---:|\n",
    );
    for setting in settings_of(runs) {
        for &b in sizes {
            let group: Vec<&RunRow> = runs
                .iter()
                .filter(|r| r.batch_size == b && r.vary == setting)
                .collect();
            let Some(t) = target.or_else(|| group_target(&group)) else {
                continue;
            };
            let label = if setting.is_empty() {
                "–".into()
            } else {
                vary::label(&setting)
            };
            for norm in norms {
                let cell: Vec<&RunRow> =
                    group.iter().copied().filter(|r| &r.norm == norm).collect();
                if cell.is_empty() {
                    continue;
                }
                let (mean, never) = convergence_row(epochs, &cell, t);
                let _ = writeln!(
                    s,
                    "| `{norm}` | {b} | {label} | {t} | {mean} | {never} of {} |",
                    cell.len()
                );
            }
        }
    }
    s
}

#[derive(clap::Args, Debug)]
pub struct CurvesArgs {
    /// The sweep folder.
    pub dir: std::path::PathBuf,
    /// The batch size whose runs to draw [default: the largest in the sweep].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Only the runs with this value of a varied key: KEY=VALUE (repeatable).
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub filter: Vec<String>,
}

/// `experiments curves`: writes `curves_B<b>[_<key>-<value>...].svg` and `.png` into the folder.
pub fn run(args: CurvesArgs) -> Result<()> {
    let dir = &args.dir;
    ensure!(
        dir.is_dir(),
        "{} is not a folder; give a sweep folder",
        dir.display()
    );
    let _lock = crate::results::lock_folder(dir)?;
    let sweep = crate::summary::Sweep::read(dir)?;
    let keys = &sweep.keys;
    let mut filter: Setting = Vec::new();
    for f in &args.filter {
        let Some((k, v)) = f.split_once('=') else {
            anyhow::bail!("--where {f:?} is not KEY=VALUE (e.g. --where base-lr=0.1)");
        };
        ensure!(
            keys.iter().any(|key| key == k),
            "--where {k}: the sweep does not vary {k}; it varies {}",
            if keys.is_empty() {
                "nothing".into()
            } else {
                keys.join(", ")
            }
        );
        let v = v
            .parse::<f64>()
            .map(|x| x.to_string())
            .unwrap_or(v.to_string());
        filter.push((k.to_string(), v));
    }
    let b = args.batch_size.unwrap_or(sweep.sizes[0]);
    ensure!(
        sweep.sizes.contains(&b),
        "--batch-size {b}: the sweep has batch sizes {:?}",
        sweep.sizes
    );
    let lines = curves(&sweep.epochs, &sweep.norms, b, &filter);
    ensure!(
        !lines.is_empty(),
        "no epochs at batch size {b} with {}",
        vary::label(&filter)
    );
    let mut stem = format!("curves_B{b}");
    for (k, v) in &filter {
        let _ = write!(stem, "_{k}-{v}");
    }
    let mut title = format!("Training curves at batch size {b} (mean over seeds)");
    if !filter.is_empty() {
        let _ = write!(title, ", {}", vary::label(&filter));
    }
    figure(&lines, &title, dir, &stem)?;
    eprintln!("wrote {}", dir.join(format!("{stem}.svg")).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(norm: &str, seed: u64, err: f64, diverged: bool) -> RunRow {
        RunRow {
            norm: norm.into(),
            batch_size: 32,
            seed,
            lr: 0.1,
            epochs: 3,
            steps: 3,
            test_error: err,
            test_error_batch_stats: err,
            test_error_large_batch_stats: err,
            train_loss: 0.1,
            wall_seconds: 1.0,
            diverged,
            test_error_precise: None,
            vary: Vec::new(),
        }
    }

    fn epoch(norm: &str, seed: u64, epoch: usize, err: f64) -> EpochRow {
        EpochRow {
            norm: norm.into(),
            batch_size: 32,
            seed,
            epoch,
            lr: 0.1,
            train_loss: 1.0 / epoch as f64,
            test_error: err,
            vary: Vec::new(),
        }
    }

    #[test]
    fn epochs_to_target_count_first_crossings_and_never() {
        // At 20%: bn reaches it at epochs 1 and 2, gn at epoch 3 once and never in its other
        // seed, ln diverged (never, whatever its epochs say). The default target is the worst
        // final mean (gn: 24.5 → 25), which bn reaches at epochs 1 and 2.
        let runs = vec![
            run("bn", 0, 10.0, false),
            run("bn", 1, 12.0, false),
            run("gn", 0, 19.0, false),
            run("gn", 1, 30.0, false),
            run("ln", 0, f64::NAN, true),
        ];
        let mut epochs = Vec::new();
        for (norm, seed, errs) in [
            ("bn", 0, [18.0, 12.0, 10.0]),
            ("bn", 1, [40.0, 20.0, 12.0]),
            ("gn", 0, [50.0, 30.0, 19.0]),
            ("gn", 1, [60.0, 40.0, 30.0]),
            ("ln", 0, [10.0, 10.0, 10.0]),
        ] {
            for (i, e) in errs.into_iter().enumerate() {
                epochs.push(epoch(norm, seed, i + 1, e));
            }
        }
        let norms = ["bn", "gn", "ln"].map(String::from);
        let t = convergence_table(&runs, &epochs, &norms, &[32], Some(20.0));
        assert!(t.contains("| `bn` | 32 | – | 20 | 1.5 | 0 of 2 |"), "{t}");
        assert!(t.contains("| `gn` | 32 | – | 20 | 3.0 | 1 of 2 |"), "{t}");
        assert!(t.contains("| `ln` | 32 | – | 20 | – | 1 of 1 |"), "{t}");
        let t = convergence_table(&runs, &epochs, &norms, &[32], None);
        assert!(t.contains("| `bn` | 32 | – | 25 | 1.5 | 0 of 2 |"), "{t}");
        assert!(t.contains("| `gn` | 32 | – | 25 | 3.0 | 1 of 2 |"), "{t}");

        let lines = curves(&epochs, &norms, 32, &Vec::new());
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].error, vec![(1.0, 29.0), (2.0, 16.0), (3.0, 11.0)]);
        assert_eq!(lines[1].loss[0], (1.0, 1.0));
    }
}
