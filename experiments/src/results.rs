//! The sweep folder's files, written so that nothing is ever half-written: rows are appended
//! one whole run at a time (a single write, then fsync), everything else is written to a
//! temporary file and renamed into place. `repair` drops what a crash may have left behind (a
//! trailing partial line, epoch rows of a run that never finished), so a resumed sweep counts
//! each finished run exactly once.

use crate::train::{EpochRow, RunKey, RunRow};
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

pub const RUNS_CSV: &str = "runs.csv";
pub const EPOCHS_CSV: &str = "epochs.csv";
pub const SUMMARY_CSV: &str = "summary.csv";
pub const SUMMARY_MD: &str = "summary.md";
pub const SUMMARY_TEX: &str = "summary.tex";
pub const MANIFEST_JSON: &str = "manifest.json";
pub const FIGURE_SVG: &str = "error_vs_batch.svg";
pub const FIGURE_PNG: &str = "error_vs_batch.png";

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

/// CSV text of `rows`, with a header line when `header`.
pub fn to_csv<T: Serialize>(rows: &[T], header: bool) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(header)
        .from_writer(Vec::new());
    for row in rows {
        w.serialize(row)?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))
}

/// Appends `rows` to the CSV file at `path` in one write (with the header if the file is new),
/// then flushes them to disk.
pub fn append_rows<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let is_new = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    let bytes = to_csv(rows, is_new)?;
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    f.write_all(&bytes)?;
    f.sync_data()?;
    Ok(())
}

/// The rows of the CSV file at `path` (none if it does not exist).
pub fn read_rows<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut r =
        csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    r.deserialize()
        .enumerate()
        .map(|(i, row)| {
            row.with_context(|| format!("{}: row {} is malformed", path.display(), i + 1))
        })
        .collect()
}

/// Cuts a trailing line without its newline (a write a crash interrupted) from `path`.
fn drop_partial_line(path: &Path) -> Result<()> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(());
    };
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    write_atomic(path, &bytes[..keep])
}

/// Makes the sweep folder consistent after a crash and returns the finished runs: their rows,
/// first occurrence of each run only, and epoch rows only for finished runs.
pub fn repair(dir: &Path) -> Result<Vec<RunRow>> {
    let (runs_path, epochs_path) = (dir.join(RUNS_CSV), dir.join(EPOCHS_CSV));
    drop_partial_line(&runs_path)?;
    drop_partial_line(&epochs_path)?;
    let all: Vec<RunRow> = read_rows(&runs_path)?;
    let mut seen = BTreeSet::new();
    let runs: Vec<RunRow> = all
        .iter()
        .filter(|r| seen.insert(r.key()))
        .cloned()
        .collect();
    if runs.len() != all.len() {
        write_atomic(&runs_path, &to_csv(&runs, true)?)?;
    }
    let epochs: Vec<EpochRow> = read_rows(&epochs_path)?;
    let mut kept_keys = BTreeSet::new();
    let kept: Vec<EpochRow> = epochs
        .iter()
        .filter(|e| seen.contains(&e.key()) && kept_keys.insert((e.key(), e.epoch)))
        .cloned()
        .collect();
    if kept.len() != epochs.len() {
        write_atomic(&epochs_path, &to_csv(&kept, true)?)?;
    }
    Ok(runs)
}

/// Records one finished run: its epoch rows first, then its row in `runs.csv`, which is what
/// marks it finished.
pub fn record_run(dir: &Path, run: &RunRow, epochs: &[EpochRow]) -> Result<()> {
    if !epochs.is_empty() {
        append_rows(&dir.join(EPOCHS_CSV), epochs)?;
    }
    append_rows(&dir.join(RUNS_CSV), std::slice::from_ref(run))
}

/// The keys of `runs`.
pub fn finished(runs: &[RunRow]) -> BTreeSet<RunKey> {
    runs.iter().map(RunRow::key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(norm: &str, b: usize, err: f64) -> RunRow {
        RunRow {
            norm: norm.into(),
            batch_size: b,
            seed: 0,
            lr: 0.1,
            epochs: 1,
            steps: 10,
            test_error: err,
            test_error_batch_stats: err,
            test_error_large_batch_stats: err,
            train_loss: f64::NAN,
            wall_seconds: 1.0,
            diverged: false,
        }
    }

    fn epoch(norm: &str, b: usize, epoch: usize) -> EpochRow {
        EpochRow {
            norm: norm.into(),
            batch_size: b,
            seed: 0,
            epoch,
            lr: 0.1,
            train_loss: 1.0,
            test_error: 50.0,
        }
    }

    #[test]
    fn repair_drops_partial_lines_duplicates_and_orphan_epochs() {
        let dir = tempfile::tempdir().unwrap();
        record_run(dir.path(), &run("bn", 32, 10.0), &[epoch("bn", 32, 1)]).unwrap();
        record_run(dir.path(), &run("bn", 32, 11.0), &[epoch("bn", 32, 1)]).unwrap();
        // A run that crashed after its epoch rows, then a half-written row.
        append_rows(&dir.path().join(EPOCHS_CSV), &[epoch("gn", 2, 1)]).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(RUNS_CSV))
            .unwrap();
        f.write_all(b"gn,2,0,0.1,1,10,12.5").unwrap();

        let runs = repair(dir.path()).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].test_error, 10.0, "first occurrence wins");
        assert!(runs[0].train_loss.is_nan(), "NaN round-trips");
        let text = std::fs::read_to_string(dir.path().join(RUNS_CSV)).unwrap();
        assert!(text.ends_with('\n') && !text.contains("12.5"));
        let epochs: Vec<EpochRow> = read_rows(&dir.path().join(EPOCHS_CSV)).unwrap();
        assert_eq!(epochs, vec![epoch("bn", 32, 1)]);
    }

    #[test]
    fn malformed_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RUNS_CSV);
        std::fs::write(&path, "norm,batch_size\nbn,notanumber\n").unwrap();
        let err = format!("{:#}", read_rows::<RunRow>(&path).unwrap_err());
        assert!(err.contains("row 1 is malformed"), "{err}");
    }
}
