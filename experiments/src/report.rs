//! Summaries of a sweep's `runs.csv`: `summary.csv` (mean and standard deviation over seeds),
//! paper-ready tables (`summary.md`, `summary.tex`) and the figure.

use crate::plot;
use crate::results::{self, write_atomic, RunRow, SummaryRow, RUNS_CSV};
use anyhow::{ensure, Result};
use std::fmt::Write as _;
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

pub fn summarize(runs: &[RunRow], preferred: &[String]) -> Vec<SummaryRow> {
    let (norms, sizes) = axes(runs, preferred);
    let mut rows = Vec::new();
    for norm in &norms {
        for &b in &sizes {
            let cell: Vec<&RunRow> = runs
                .iter()
                .filter(|r| &r.norm == norm && r.batch_size == b)
                .collect();
            if cell.is_empty() {
                continue;
            }
            let ok: Vec<&RunRow> = cell.iter().copied().filter(|r| !r.diverged).collect();
            let col = |f: fn(&RunRow) -> f64| ok.iter().map(|r| f(r)).collect::<Vec<f64>>();
            let (mean, std) = mean_std(&col(|r| r.test_error));
            rows.push(SummaryRow {
                norm: norm.clone(),
                batch_size: b,
                n: ok.len(),
                test_error_mean: mean,
                test_error_std: std,
                test_error_batch_stats_mean: mean_std(&col(|r| r.test_error_batch_stats)).0,
                test_error_large_batch_stats_mean: mean_std(&col(|r| {
                    r.test_error_large_batch_stats
                }))
                .0,
                n_diverged: cell.len() - ok.len(),
            });
        }
    }
    rows
}

fn cell<'a>(rows: &'a [SummaryRow], norm: &str, b: usize) -> Option<&'a SummaryRow> {
    rows.iter().find(|r| r.norm == norm && r.batch_size == b)
}

fn fmt_cell(r: Option<&SummaryRow>, pm: &str) -> String {
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

/// `B=32 | B=16 | …`: the batch-size columns of a markdown table.
fn size_columns(sizes: &[usize]) -> String {
    let cols: Vec<String> = sizes.iter().map(|b| format!("B={b}")).collect();
    cols.join(" | ")
}

pub fn markdown(rows: &[SummaryRow], norms: &[String], sizes: &[usize]) -> String {
    let mut s = String::from(
        "Test error (%), mean ± standard deviation over seeds, by batch size per step.\n\n",
    );
    let _ = writeln!(s, "| normalizer | {} |", size_columns(sizes));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(sizes.len()));
    for norm in norms {
        let cells: Vec<String> = sizes
            .iter()
            .map(|&b| fmt_cell(cell(rows, norm, b), " ± "))
            .collect();
        let _ = writeln!(s, "| `{norm}` | {} |", cells.join(" | "));
    }
    let batch_dependent: Vec<&String> = norms
        .iter()
        .filter(|n| {
            rows.iter().any(|r| {
                &r.norm == *n && (r.test_error_batch_stats_mean - r.test_error_mean).abs() > 1e-9
            })
        })
        .collect();
    if !batch_dependent.is_empty() {
        s.push_str(
            "\nNormalizers with running statistics, evaluated three ways (mean test error, %): with \
             the running statistics; with the statistics of test batches of the training batch \
             size B; with the statistics of test batches of 250 (Wu & Johnson 2021).\n\n",
        );
        let _ = writeln!(s, "| normalizer | evaluation | {} |", size_columns(sizes));
        let _ = writeln!(s, "|---|---|{}", "---:|".repeat(sizes.len()));
        for norm in batch_dependent {
            for (label, f) in [
                (
                    "running statistics",
                    (|r: &SummaryRow| r.test_error_mean) as fn(&SummaryRow) -> f64,
                ),
                ("test batches of B", |r| r.test_error_batch_stats_mean),
                ("test batches of 250", |r| {
                    r.test_error_large_batch_stats_mean
                }),
            ] {
                let cells: Vec<String> = sizes
                    .iter()
                    .map(|&b| cell(rows, norm, b).map_or("–".into(), |r| format!("{:.1}", f(r))))
                    .collect();
                let _ = writeln!(s, "| `{norm}` | {label} | {} |", cells.join(" | "));
            }
        }
    }
    s
}

fn tex_escape(s: &str) -> String {
    s.replace('_', "\\_")
        .replace('%', "\\%")
        .replace('&', "\\&")
}

pub fn latex(rows: &[SummaryRow], norms: &[String], sizes: &[usize]) -> String {
    let mut s =
        String::from("% Generated by `experiments report`; needs \\usepackage{booktabs}.\n");
    s.push_str("\\begin{table}[t]\n\\centering\n");
    let _ = writeln!(s, "\\begin{{tabular}}{{l{}}}", "r".repeat(sizes.len()));
    s.push_str("\\toprule\n");
    let _ = writeln!(
        s,
        "normalizer & {} \\\\",
        sizes
            .iter()
            .map(|b| format!("$B={b}$"))
            .collect::<Vec<_>>()
            .join(" & ")
    );
    s.push_str("\\midrule\n");
    for norm in norms {
        let cells: Vec<String> = sizes
            .iter()
            .map(|&b| {
                fmt_cell(cell(rows, norm, b), " \\pm ")
                    .replace(" \\pm ", "$\\pm$")
                    .replace('–', "--")
            })
            .collect();
        let _ = writeln!(
            s,
            "\\texttt{{{}}} & {} \\\\",
            tex_escape(norm),
            cells.join(" & ")
        );
    }
    s.push_str("\\bottomrule\n\\end{tabular}\n");
    s.push_str("\\caption{Test error (\\%) by batch size per step, mean $\\pm$ standard deviation over seeds.}\n");
    s.push_str("\\end{table}\n");
    s
}

/// Rebuilds `summary.csv`, `summary.md`, `summary.tex` and the figure from `runs.csv`.
pub fn report(dir: &Path) -> Result<Vec<SummaryRow>> {
    // A folder a crash left behind reads as a repair would leave it, without writing to it.
    let runs: Vec<RunRow> = results::read_consistent(dir)?.runs;
    ensure!(
        !runs.is_empty(),
        "{} has no finished runs: run a sweep into it first (experiments sweep --out {})",
        dir.join(RUNS_CSV).display(),
        dir.display()
    );
    // Rows of runs.csv are in the order runs finished; tables follow the sweep's --norms.
    let preferred: Vec<String> = std::fs::read_to_string(dir.join(results::MANIFEST_JSON))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|m| serde_json::from_value(m["norms"].clone()).ok())
        .unwrap_or_default();
    let rows = summarize(&runs, &preferred);
    let (norms, sizes) = axes(&runs, &preferred);
    write_atomic(
        &dir.join(results::SUMMARY_CSV),
        &results::to_csv(&rows, true)?,
    )?;
    write_atomic(
        &dir.join(results::SUMMARY_MD),
        markdown(&rows, &norms, &sizes).as_bytes(),
    )?;
    write_atomic(
        &dir.join(results::SUMMARY_TEX),
        latex(&rows, &norms, &sizes).as_bytes(),
    )?;
    plot::error_vs_batch(&rows, &norms, &sizes, dir)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    }

    #[test]
    fn tables_follow_the_sweeps_order_of_normalizers() {
        let row = |norm: &str, b| RunRow {
            norm: norm.into(),
            batch_size: b,
            seed: 0,
            lr: 0.1,
            epochs: 1,
            steps: 1,
            test_error: 1.0,
            test_error_batch_stats: 1.0,
            test_error_large_batch_stats: 1.0,
            train_loss: 1.0,
            wall_seconds: 1.0,
            diverged: false,
        };
        let runs = vec![row("gn", 2), row("ln", 8), row("bn", 32)];
        let preferred = vec!["bn".to_string(), "gn".to_string()];
        assert_eq!(
            axes(&runs, &preferred),
            (vec!["bn".into(), "gn".into(), "ln".into()], vec![32, 8, 2])
        );
    }

    #[test]
    fn summary_excludes_diverged_runs_and_counts_them() {
        let row = |norm: &str, b, seed, err: f64, diverged| RunRow {
            norm: norm.into(),
            batch_size: b,
            seed,
            lr: 0.1,
            epochs: 1,
            steps: 1,
            test_error: err,
            test_error_batch_stats: err + 1.0,
            test_error_large_batch_stats: err,
            train_loss: 1.0,
            wall_seconds: 1.0,
            diverged,
        };
        let runs = vec![
            row("bn", 2, 0, 30.0, false),
            row("bn", 32, 0, 10.0, false),
            row("bn", 2, 1, 40.0, false),
            row("bn", 2, 2, f64::NAN, true),
        ];
        let rows = summarize(&runs, &[]);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].batch_size, rows[0].n), (32, 1));
        let b2 = &rows[1];
        assert_eq!((b2.n, b2.n_diverged, b2.test_error_mean), (2, 1, 35.0));
        let (norms, sizes) = axes(&runs, &[]);
        let md = markdown(&rows, &norms, &sizes);
        assert!(
            md.contains("| `bn` | 10.0 ± 0.0 | 35.0 ± 7.1 (1 diverged) |"),
            "{md}"
        );
        assert!(md.contains("test batches of B"));
        let tex = latex(&rows, &norms, &sizes);
        assert!(
            tex.contains("\\texttt{bn} & 10.0$\\pm$0.0 & 35.0$\\pm$7.1 (1 diverged) \\\\"),
            "{tex}"
        );
    }
}
