//! The sweep folder's files, written so that nothing is ever half-written: rows are appended
//! one whole run at a time (a single write, then fsync), everything else is written to a
//! temporary file of this process's own and renamed into place. `repair` drops what a crash may
//! have left behind (a trailing partial line, epoch rows of a run that never finished), so a
//! resumed sweep counts each finished run exactly once. One process at a time writes a folder:
//! [`lock_folder`] takes an OS lock that dies with its holder, so kill -9 leaves nothing stale.

use crate::vary::Setting;
use anyhow::{bail, Context, Result};
use csv::StringRecord;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;

pub const RUNS_CSV: &str = "runs.csv";
pub const EPOCHS_CSV: &str = "epochs.csv";
pub const SUMMARY_CSV: &str = "summary.csv";
pub const SUMMARY_MD: &str = "summary.md";
pub const SUMMARY_TEX: &str = "summary.tex";
pub const MANIFEST_JSON: &str = "manifest.json";
/// Test error against batch size (`.svg` and `.png`).
pub const FIGURE: &str = "error_vs_batch";
/// Training loss and test error per epoch (`.svg` and `.png`).
pub const CURVES: &str = "curves";
pub const LOCK_FILE: &str = ".normbench.lock";

/// One run of the sweep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    pub norm: String,
    pub batch_size: usize,
    pub seed: u64,
    /// The run's values of the sweep's `--vary` keys (empty when nothing is varied).
    pub vary: Setting,
}

impl RunKey {
    pub fn with(norm: &str, batch_size: usize, seed: u64, vary: Setting) -> Self {
        Self {
            norm: norm.to_string(),
            batch_size,
            seed,
            vary,
        }
    }
}

/// Rows that carry the values of the sweep's varied keys beside their own fields: written as
/// extra columns named by the keys, read back from them.
pub trait Varied {
    fn vary(&self) -> &Setting;
    fn vary_mut(&mut self) -> &mut Setting;
}

macro_rules! varied {
    ($($t:ty),*) => {$(
        impl Varied for $t {
            fn vary(&self) -> &Setting {
                &self.vary
            }
            fn vary_mut(&mut self) -> &mut Setting {
                &mut self.vary
            }
        }
    )*};
}
varied!(RunRow, EpochRow, SummaryRow);

/// A row of `runs.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRow {
    pub norm: String,
    pub batch_size: usize,
    pub seed: u64,
    pub lr: f64,
    pub epochs: usize,
    pub steps: usize,
    /// Percent, normalizers in evaluation mode (BatchNorm with its running statistics).
    pub test_error: f64,
    /// Percent, normalizing with the statistics of test batches of the training batch size.
    pub test_error_batch_stats: f64,
    /// Percent, normalizing with the statistics of test batches of `large_eval_batch`.
    pub test_error_large_batch_stats: f64,
    /// Mean training loss of the last epoch.
    pub train_loss: f64,
    pub wall_seconds: f64,
    pub diverged: bool,
    /// Percent, with PreciseBN's running statistics (recomputed over the training set with the
    /// weights frozen); empty for normalizers without running statistics (and in files written
    /// before the column existed).
    #[serde(default)]
    pub test_error_precise: Option<f64>,
    #[serde(skip)]
    pub vary: Setting,
}

impl RunRow {
    pub fn key(&self) -> RunKey {
        RunKey::with(&self.norm, self.batch_size, self.seed, self.vary.clone())
    }
}

/// A row of `epochs.csv`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRow {
    pub norm: String,
    pub batch_size: usize,
    pub seed: u64,
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub test_error: f64,
    #[serde(skip)]
    pub vary: Setting,
}

impl EpochRow {
    pub fn key(&self) -> RunKey {
        RunKey::with(&self.norm, self.batch_size, self.seed, self.vary.clone())
    }
}

/// A row of `summary.csv`: one normalizer at one batch size, over its seeds. Diverged runs
/// count in `n_diverged`, not in the statistics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SummaryRow {
    pub norm: String,
    pub batch_size: usize,
    pub n: usize,
    pub test_error_mean: f64,
    pub test_error_std: f64,
    pub test_error_batch_stats_mean: f64,
    pub test_error_large_batch_stats_mean: f64,
    pub n_diverged: usize,
    /// The mean of `test_error_precise` where the runs have it.
    #[serde(default)]
    pub test_error_precise_mean: Option<f64>,
    #[serde(skip)]
    pub vary: Setting,
}

/// Holds a results folder for this process until dropped (or the process ends).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

/// Takes the exclusive lock of the results folder `dir` (creating it), or fails at once naming
/// the folder and the holder's pid.
pub fn lock_folder(dir: &Path) -> Result<FolderLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_data()?;
            Ok(FolderLock { _file: file })
        }
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "{} is in use by another normbench process (pid {}); wait for it to finish, or \
                 write to another folder",
                dir.display(),
                holder.trim()
            )
        }
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Writes `bytes` to `path` through a temporary file of this process's own in the same folder
/// and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

/// `row`'s column names and values, as serde writes them.
fn fields<T: Serialize>(row: &T) -> Result<(StringRecord, StringRecord)> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.serialize(row)?;
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
    let mut r = csv::Reader::from_reader(&bytes[..]);
    let names = r.headers()?.clone();
    let values = r.records().next().context("csv: a row wrote no values")??;
    Ok((names, values))
}

/// CSV text of `rows`, with a header line when `header`: each row's fields, then a column per
/// varied key (one the row already has, such as `epochs`, is not repeated).
pub fn to_csv<T: Serialize + Varied>(rows: &[T], header: bool) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    let mut header_due = header;
    for row in rows {
        let (mut names, mut values) = fields(row)?;
        for (key, value) in row.vary() {
            if !names.iter().any(|n| n == key) {
                names.push_field(key);
                values.push_field(value);
            }
        }
        if header_due {
            w.write_record(&names)?;
            header_due = false;
        }
        w.write_record(&values)?;
    }
    w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))
}

/// Appends `rows` to the CSV file at `path` in one write (with the header if the file is new),
/// then flushes them to disk. A file whose header differs from the rows' (written by another
/// version of normbench, or for other varied keys) is refused, not appended to.
pub fn append_rows<T: Serialize + Varied>(path: &Path, rows: &[T]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let bytes = to_csv(rows, true)?;
    let split = bytes
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| i + 1);
    let (header, body) = bytes.split_at(split);
    let existing = match std::fs::File::open(path) {
        Ok(f) => {
            let mut first = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(f), &mut first)?;
            first
        }
        Err(_) => String::new(),
    };
    let new_header = String::from_utf8_lossy(header);
    if !existing.is_empty() && existing.trim_end() != new_header.trim_end() {
        bail!(
            "{} has the columns\n  {}\nbut this version of normbench writes\n  {}\nIt was \
             written by another version (or another sweep); resume it with that version, or \
             start a new folder with --out",
            path.display(),
            existing.trim_end(),
            new_header.trim_end()
        );
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    f.write_all(if existing.is_empty() { &bytes } else { body })?;
    f.sync_data()?;
    Ok(())
}

/// The rows of the CSV file at `path` (none if it does not exist), with the values of the
/// varied `keys` read from their columns.
pub fn read_rows<T: DeserializeOwned + Varied>(path: &Path, keys: &[String]) -> Result<Vec<T>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_rows(&bytes, path, keys)
}

/// The column of each varied key; refuses a file whose varied columns are not `keys` (reading it
/// as another sweep's would merge runs that differ in a setting).
fn key_columns(headers: &StringRecord, keys: &[String], path: &Path) -> Result<Vec<usize>> {
    for h in headers.iter() {
        let varied = crate::vary::KEYS.iter().any(|(k, _)| *k == h);
        if varied && h != "epochs" && !keys.iter().any(|k| k == h) {
            bail!(
                "{} has a column {h:?}, a --vary key that its sweep's manifest does not name; \
                 it belongs to another sweep (or its manifest.json is missing)",
                path.display()
            );
        }
    }
    keys.iter()
        .map(|k| {
            headers.iter().position(|h| h == k).with_context(|| {
                format!(
                    "{} has no column {k:?}, but its sweep varies {k}; it belongs to another \
                     sweep",
                    path.display()
                )
            })
        })
        .collect()
}

fn parse_rows<T: DeserializeOwned + Varied>(
    bytes: &[u8],
    path: &Path,
    keys: &[String],
) -> Result<Vec<T>> {
    let mut reader = csv::Reader::from_reader(bytes);
    let headers = reader.headers()?.clone();
    let columns = key_columns(&headers, keys, path)?;
    reader
        .records()
        .enumerate()
        .map(|(i, record)| {
            let malformed = || format!("{}: row {} is malformed", path.display(), i + 1);
            let record = record.with_context(malformed)?;
            let mut row: T = record.deserialize(Some(&headers)).with_context(malformed)?;
            *row.vary_mut() = keys
                .iter()
                .zip(&columns)
                .map(|(k, &c)| (k.clone(), record.get(c).unwrap_or("").to_string()))
                .collect();
            Ok(row)
        })
        .collect()
}

/// The keys a sweep folder varies, from its manifest (none without one).
pub fn varied_keys(dir: &Path) -> Result<Vec<String>> {
    let settings = manifest_settings(dir)?;
    Ok(serde_json::from_value(settings["vary"].clone()).unwrap_or_default())
}

/// The `settings` of a sweep folder's manifest; null where the folder has no manifest.
fn manifest_settings(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(MANIFEST_JSON);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(serde_json::Value::Null);
    };
    let m: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(m["settings"].clone())
}

/// The simulated devices of a sweep folder's runs (`--devices`, from its manifest): 1 where the
/// manifest does not say (older sweeps, one device) or where `--vary devices` sets it per run.
pub fn devices(dir: &Path) -> Result<usize> {
    let settings = manifest_settings(dir)?;
    Ok(settings["train"]["devices"].as_u64().unwrap_or(1) as usize)
}

/// The rows of `path` up to its last newline (a line without one is a write a crash
/// interrupted), and whether a partial line was left out.
fn complete_rows<T: DeserializeOwned + Varied>(
    path: &Path,
    keys: &[String],
) -> Result<(Vec<T>, bool)> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok((Vec::new(), false));
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Ok((parse_rows(&bytes[..keep], path, keys)?, keep != bytes.len()))
}

/// A sweep folder's rows as a repair leaves them, read without changing the folder.
pub struct Consistent {
    /// Finished runs, the first row of each.
    pub runs: Vec<RunRow>,
    /// Epoch rows of finished runs, the first of each epoch.
    pub epochs: Vec<EpochRow>,
    runs_changed: bool,
    epochs_changed: bool,
}

/// Reads `dir`'s rows as [`repair`] would leave them, in memory: what `report` reads, so that it
/// neither fails on a crash's partial line nor counts a run twice.
pub fn read_consistent(dir: &Path, keys: &[String]) -> Result<Consistent> {
    let (all, runs_cut): (Vec<RunRow>, bool) = complete_rows(&dir.join(RUNS_CSV), keys)?;
    let mut seen = BTreeSet::new();
    let runs: Vec<RunRow> = all
        .iter()
        .filter(|r| seen.insert(r.key()))
        .cloned()
        .collect();
    let (epochs, epochs_cut): (Vec<EpochRow>, bool) = complete_rows(&dir.join(EPOCHS_CSV), keys)?;
    let mut kept_keys = BTreeSet::new();
    let kept: Vec<EpochRow> = epochs
        .iter()
        .filter(|e| seen.contains(&e.key()) && kept_keys.insert((e.key(), e.epoch)))
        .cloned()
        .collect();
    Ok(Consistent {
        runs_changed: runs_cut || runs.len() != all.len(),
        epochs_changed: epochs_cut || kept.len() != epochs.len(),
        runs,
        epochs: kept,
    })
}

/// Makes the sweep folder consistent after a crash and returns the finished runs: their rows,
/// first occurrence of each run only, and epoch rows only for finished runs.
pub fn repair(dir: &Path, keys: &[String]) -> Result<Vec<RunRow>> {
    let c = read_consistent(dir, keys)?;
    write_rows(dir, &c)?;
    Ok(c.runs)
}

fn write_rows(dir: &Path, c: &Consistent) -> Result<()> {
    if c.runs_changed {
        write_atomic(&dir.join(RUNS_CSV), &to_csv(&c.runs, true)?)?;
    }
    if c.epochs_changed {
        write_atomic(&dir.join(EPOCHS_CSV), &to_csv(&c.epochs, true)?)?;
    }
    Ok(())
}

/// Repairs `dir` and removes the runs that diverged (their rows and epoch rows), so that a
/// resumed sweep trains them again; returns the runs that stay finished.
pub fn forget_diverged(dir: &Path, keys: &[String]) -> Result<Vec<RunRow>> {
    let mut c = read_consistent(dir, keys)?;
    let before = c.runs.len();
    c.runs.retain(|r| !r.diverged);
    if c.runs.len() != before {
        let keep = finished(&c.runs);
        c.epochs.retain(|e| keep.contains(&e.key()));
        c.runs_changed = true;
        c.epochs_changed = true;
    }
    write_rows(dir, &c)?;
    Ok(c.runs)
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
            test_error_precise: None,
            vary: Vec::new(),
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
            vary: Vec::new(),
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

        let runs = repair(dir.path(), &[]).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].test_error, 10.0, "first occurrence wins");
        assert!(runs[0].train_loss.is_nan(), "NaN round-trips");
        let text = std::fs::read_to_string(dir.path().join(RUNS_CSV)).unwrap();
        assert!(text.ends_with('\n') && !text.contains("12.5"));
        let epochs: Vec<EpochRow> = read_rows(&dir.path().join(EPOCHS_CSV), &[]).unwrap();
        assert_eq!(epochs, vec![epoch("bn", 32, 1)]);
    }

    #[test]
    fn reading_consistently_changes_nothing_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        record_run(dir.path(), &run("bn", 32, 10.0), &[epoch("bn", 32, 1)]).unwrap();
        record_run(dir.path(), &run("bn", 32, 11.0), &[epoch("bn", 32, 1)]).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(RUNS_CSV))
            .unwrap();
        f.write_all(b"gn,2,0,0.1,1,10,12.5").unwrap();
        let before = std::fs::read(dir.path().join(RUNS_CSV)).unwrap();
        let c = read_consistent(dir.path(), &[]).unwrap();
        assert_eq!((c.runs.len(), c.epochs.len()), (1, 1));
        assert_eq!(std::fs::read(dir.path().join(RUNS_CSV)).unwrap(), before);
    }

    #[test]
    fn forgetting_diverged_runs_drops_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad = run("gn", 2, f64::NAN);
        bad.diverged = true;
        record_run(dir.path(), &run("bn", 32, 10.0), &[epoch("bn", 32, 1)]).unwrap();
        record_run(dir.path(), &bad, &[epoch("gn", 2, 1)]).unwrap();
        let kept = forget_diverged(dir.path(), &[]).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].norm.as_str(), kept[0].diverged), ("bn", false));
        let runs: Vec<RunRow> = read_rows(&dir.path().join(RUNS_CSV), &[]).unwrap();
        let epochs: Vec<EpochRow> = read_rows(&dir.path().join(EPOCHS_CSV), &[]).unwrap();
        assert_eq!((runs.len(), epochs), (1, vec![epoch("bn", 32, 1)]));
    }

    #[test]
    fn a_locked_folder_refuses_a_second_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_folder(dir.path()).unwrap();
        let e = lock_folder(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another normbench process"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        lock_folder(dir.path()).unwrap();
    }

    #[test]
    fn temporary_files_are_this_process_s_own() {
        // Another writer's temporary file (here a folder in its way) does not stop this one.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_JSON);
        std::fs::create_dir(dir.path().join("manifest.json.tmp")).unwrap();
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
    }

    #[test]
    fn varied_settings_round_trip_as_columns_and_other_sweeps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vary = |lr: &str| {
            vec![
                ("base-lr".to_string(), lr.to_string()),
                ("epochs".to_string(), "1".to_string()),
            ]
        };
        let (mut a, mut b) = (run("bn", 32, 10.0), run("bn", 32, 20.0));
        a.vary = vary("0.1");
        b.vary = vary("0.4");
        let mut e = epoch("bn", 32, 1);
        e.vary = vary("0.4");
        record_run(dir.path(), &a, &[]).unwrap();
        record_run(dir.path(), &b, std::slice::from_ref(&e)).unwrap();
        let text = std::fs::read_to_string(dir.path().join(RUNS_CSV)).unwrap();
        // `epochs` is a field of the row already: not repeated.
        assert!(
            text.starts_with("norm,batch_size,seed,lr,epochs,steps,"),
            "{text}"
        );
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with(",diverged,test_error_precise,base-lr"),
            "{text}"
        );
        let keys = vec!["base-lr".to_string(), "epochs".to_string()];
        let runs = repair(dir.path(), &keys).unwrap();
        // Same norm, size and seed: two runs, told apart by their setting.
        let got: Vec<(RunKey, f64)> = runs.iter().map(|r| (r.key(), r.test_error)).collect();
        assert_eq!(got, vec![(a.key(), 10.0), (b.key(), 20.0)]);
        let epochs: Vec<EpochRow> = read_rows(&dir.path().join(EPOCHS_CSV), &keys).unwrap();
        assert_eq!(epochs, vec![e]);
        let err = format!("{:#}", repair(dir.path(), &[]).unwrap_err());
        assert!(
            err.contains("a --vary key that its sweep's manifest does not name"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            repair(
                dir.path(),
                &[keys.clone(), vec!["dropout".to_string()]].concat()
            )
            .unwrap_err()
        );
        assert!(err.contains("has no column \"dropout\""), "{err}");
    }

    #[test]
    fn a_file_with_other_columns_is_refused_not_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RUNS_CSV);
        let old = "norm,batch_size,seed,lr,epochs,steps,test_error,test_error_batch_stats,\
                   test_error_large_batch_stats,train_loss,wall_seconds,diverged\n\
                   bn,32,0,0.1,1,10,10.0,10.0,10.0,1.0,1.0,false\n";
        std::fs::write(&path, old).unwrap();
        let e = append_rows(&path, &[run("bn", 16, 5.0)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("another version") && e.contains("--out"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            old,
            "left as it was"
        );
        // Old files still read: the new column is empty.
        let rows: Vec<RunRow> = csv::Reader::from_path(&path)
            .unwrap()
            .deserialize()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(rows[0].test_error_precise, None);
    }

    #[test]
    fn malformed_rows_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RUNS_CSV);
        std::fs::write(&path, "norm,batch_size\nbn,notanumber\n").unwrap();
        let err = format!("{:#}", read_rows::<RunRow>(&path, &[]).unwrap_err());
        assert!(err.contains("row 1 is malformed"), "{err}");
    }
}
