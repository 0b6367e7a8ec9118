//! Summaries of a sweep folder: its finished runs read back, the mean and standard deviation
//! of each cell (normalizer × batch size × varied setting) over seeds, and a cell as text.

use crate::results::{self, EpochRow, RunRow, SummaryRow, Varied, RUNS_CSV};
use crate::vary::Setting;
use anyhow::{ensure, Result};
use std::path::Path;

/// Mean and sample standard deviation (n − 1; 0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Normalizers in the order of `preferred` (the sweep's `--norms`), then any others in order of
/// first appearance; batch sizes from largest to smallest.
pub fn axes(runs: &[RunRow], preferred: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut norms: Vec<String> = preferred
        .iter()
        .filter(|n| runs.iter().any(|r| &&r.norm == n))
        .cloned()
        .collect();
    let mut sizes: Vec<usize> = Vec::new();
    for r in runs {
        if !norms.contains(&r.norm) {
            norms.push(r.norm.clone());
        }
        if !sizes.contains(&r.batch_size) {
            sizes.push(r.batch_size);
        }
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    (norms, sizes)
}

/// The distinct settings of `runs`' varied keys, ordered by their values (as numbers).
pub fn settings_of<T: Varied>(runs: &[T]) -> Vec<Setting> {
    distinct_settings(runs.iter().map(Varied::vary))
}

/// The distinct ones of `settings`, ordered by their values (as numbers).
pub fn distinct_settings<'a>(settings: impl IntoIterator<Item = &'a Setting>) -> Vec<Setting> {
    let mut all: Vec<Setting> = Vec::new();
    for s in settings {
        if !all.contains(s) {
            all.push(s.clone());
        }
    }
    let number = |v: &str| v.parse::<f64>().unwrap_or(f64::NAN);
    all.sort_by(|a, b| {
        a.iter()
            .zip(b)
            .map(|((_, x), (_, y))| number(x).total_cmp(&number(y)))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    all
}

pub fn summarize(runs: &[RunRow], preferred: &[String]) -> Vec<SummaryRow> {
    let (norms, sizes) = axes(runs, preferred);
    let mut rows = Vec::new();
    for setting in settings_of(runs) {
        for norm in &norms {
            for &b in &sizes {
                let cell: Vec<&RunRow> = runs
                    .iter()
                    .filter(|r| &r.norm == norm && r.batch_size == b && r.vary == setting)
                    .collect();
                if !cell.is_empty() {
                    rows.push(summary_row(&cell, setting.clone()));
                }
            }
        }
    }
    rows
}

/// One cell's summary: statistics over its finished runs, diverged runs counted apart.
fn summary_row(cell: &[&RunRow], vary: Setting) -> SummaryRow {
    let ok: Vec<&RunRow> = cell.iter().copied().filter(|r| !r.diverged).collect();
    let col = |f: fn(&RunRow) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let (mean, std) = mean_std(&col(|r| r.test_error));
    SummaryRow {
        norm: cell[0].norm.clone(),
        batch_size: cell[0].batch_size,
        n: ok.len(),
        test_error_mean: mean,
        test_error_std: std,
        test_error_batch_stats_mean: mean_std(&col(|r| r.test_error_batch_stats)).0,
        test_error_large_batch_stats_mean: mean_std(&col(|r| r.test_error_large_batch_stats)).0,
        test_error_precise_mean: {
            let precise: Vec<f64> = ok.iter().filter_map(|r| r.test_error_precise).collect();
            (!precise.is_empty()).then(|| mean_std(&precise).0)
        },
        n_diverged: cell.len() - ok.len(),
        vary,
    }
}

pub fn fmt_cell(r: Option<&SummaryRow>, pm: &str) -> String {
    match r {
        None => "–".into(),
        Some(r) if r.n == 0 => "diverged".into(),
        Some(r) => {
            let div = if r.n_diverged > 0 {
                format!(" ({} diverged)", r.n_diverged)
            } else {
                String::new()
            };
            format!("{:.1}{pm}{:.1}{div}", r.test_error_mean, r.test_error_std)
        }
    }
}

pub fn tex_escape(s: &str) -> String {
    s.replace('_', "\\_")
        .replace('%', "\\%")
        .replace('&', "\\&")
}

/// The sweep's `--norms` in order (tables follow it rather than the order runs finished).
fn preferred_norms(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(results::MANIFEST_JSON))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|m| serde_json::from_value(m["norms"].clone()).ok())
        .unwrap_or_default()
}

/// A folder's finished runs and their epochs, read as a repair would leave them (without
/// writing), with the normalizers and batch sizes in table order.
pub struct Sweep {
    /// The keys the sweep varies (from its manifest).
    pub keys: Vec<String>,
    pub runs: Vec<RunRow>,
    pub epochs: Vec<EpochRow>,
    pub norms: Vec<String>,
    pub sizes: Vec<usize>,
}

impl Sweep {
    pub fn read(dir: &Path) -> Result<Self> {
        let keys = results::varied_keys(dir)?;
        let c = results::read_consistent(dir, &keys)?;
        ensure!(
            !c.runs.is_empty(),
            "{} has no finished runs: run a sweep into it first (experiments sweep --out {})",
            dir.join(RUNS_CSV).display(),
            dir.display()
        );
        let (norms, sizes) = axes(&c.runs, &preferred_norms(dir));
        Ok(Self {
            keys,
            runs: c.runs,
            epochs: c.epochs,
            norms,
            sizes,
        })
    }
}
