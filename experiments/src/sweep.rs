//! The sweep: every normalizer × batch size × seed, run in parallel jobs, resumable, shardable.

use crate::data::{Dataset, DatasetSpec};
use crate::manifest::{check_settings, now, Manifest};
use crate::model::{split_ws, WS_SUFFIX};
use crate::model::{ModelConfig, ResNet};
use crate::report;
use crate::results::{self, write_atomic, EpochRow, RunKey, RunRow, MANIFEST_JSON};
use crate::train::{self, TrainConfig};
use crate::vary::{self, Axis};
use anyhow::{bail, ensure, Context, Result};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use normalizers::NormSpec;
use serde_json::json;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

/// Everything a sweep runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub norms: Vec<String>,
    pub batch_sizes: Vec<usize>,
    pub seeds: Vec<u64>,
    pub dataset: DatasetSpec,
    pub train: TrainConfig,
    /// The `--vary` axes: settings of `train` that differ between runs.
    pub vary: Vec<Axis>,
    /// (i, n): this process runs the i-th of n interleaved shares of the runs, 1 ≤ i ≤ n.
    pub shard: Option<(usize, usize)>,
}

/// Splits a comma-separated list of spec strings, where a spec's own options also use commas:
/// a piece with `=` but no `:` continues the spec before it (`bn,gn:groups=8,eps=1e-3,ln`).
/// Each spec is returned in canonical form; `gn` and `evonorm-s0` without `groups` take the
/// model's `groups`, and a `+ws` suffix (`gn+ws`) asks for Weight Standardization of the
/// model's convolutions in that entry's runs (it stays in the entry's name).
pub fn parse_norms(list: &str, groups: usize) -> Result<Vec<String>> {
    let mut specs: Vec<String> = Vec::new();
    for piece in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match specs.last_mut() {
            Some(prev) if piece.contains('=') && !piece.contains(':') => {
                prev.push(',');
                prev.push_str(piece);
            }
            _ => specs.push(piece.to_string()),
        }
    }
    ensure!(
        !specs.is_empty(),
        "--norms is empty; give spec strings such as bn,gn:groups=8"
    );
    let mut canonical = Vec::new();
    for entry in specs {
        let (spec, ws) = split_ws(&entry);
        let spec = with_model_groups(spec, groups);
        let parsed: NormSpec = spec
            .parse()
            .with_context(|| format!("--norms: bad spec {entry:?}"))?;
        let c = format!("{parsed}{}", if ws { WS_SUFFIX } else { "" });
        ensure!(!canonical.contains(&c), "--norms names {c} twice");
        canonical.push(c);
    }
    Ok(canonical)
}

/// `spec` with `groups=G` added where it names a grouped layer (`gn`, `evonorm-s0`) without
/// its groups: in a sweep they default to the model's groups, not the layer's 32.
fn with_model_groups(spec: &str, groups: usize) -> String {
    let (name, options) = spec.split_once(':').unwrap_or((spec, ""));
    let grouped = ["gn", "group", "evonorm-s0", "evonorm_s0"]
        .contains(&name.trim().to_ascii_lowercase().as_str());
    if !grouped || options.to_ascii_lowercase().contains("groups=") {
        return spec.to_string();
    }
    match options.trim() {
        "" => format!("{}:groups={groups}", name.trim()),
        o => format!("{}:groups={groups},{o}", name.trim()),
    }
}

/// Parses `i/n` with 1 ≤ i ≤ n.
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let parsed = s.split_once('/').and_then(|(i, n)| {
        Some((
            i.trim().parse::<usize>().ok()?,
            n.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((i, n)) if n >= 1 && (1..=n).contains(&i) => Ok((i, n)),
        _ => bail!("--shard {s:?} is not i/n with 1 <= i <= n (e.g. --shard 2/4 runs the second of four shares)"),
    }
}

impl Plan {
    /// All runs, seeds outermost (a partial sweep has complete comparisons for its first seeds),
    /// then varied settings, then batch sizes, then normalizers; only this shard's share.
    pub fn runs(&self) -> Vec<RunKey> {
        let mut all = Vec::new();
        for &seed in &self.seeds {
            for setting in vary::settings(&self.vary) {
                for &batch_size in &self.batch_sizes {
                    for norm in &self.norms {
                        all.push(RunKey::with(norm, batch_size, seed, setting.clone()));
                    }
                }
            }
        }
        match self.shard {
            Some((i, n)) => all
                .into_iter()
                .enumerate()
                .filter(|(j, _)| j % n == i - 1)
                .map(|(_, k)| k)
                .collect(),
            None => all,
        }
    }

    /// The varied keys, in the order given.
    pub fn keys(&self) -> Vec<String> {
        self.vary.iter().map(|a| a.key.clone()).collect()
    }

    /// The settings every run of a sweep folder must share (everything but what is swept): with
    /// `--vary`, the varied keys in place of their fixed values (which no run uses).
    pub fn settings(&self) -> serde_json::Value {
        let mut settings = json!({ "dataset": self.dataset.to_string(), "train": self.train });
        if !self.vary.is_empty() {
            for key in self.keys() {
                let field = key.replace('-', "_");
                if let Some(v) = settings["train"].get_mut(&field) {
                    *v = serde_json::Value::Null;
                }
            }
            settings["vary"] = json!(self.keys());
        }
        settings
    }

    /// The manifest's description of the plan: its settings, grid and shard.
    fn manifest_fields(&self) -> serde_json::Value {
        json!({
            "settings": self.settings(),
            "norms": self.norms,
            "batch_sizes": self.batch_sizes,
            "seeds": self.seeds,
            "shard": self.shard.map(|(i, n)| format!("{i}/{n}")),
        })
    }

    /// A stable name for the sweep's settings: `sweep-` and 8 hex digits of their FNV-1a hash.
    pub fn id(&self) -> String {
        let text = self.settings().to_string();
        let hash = text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        format!("sweep-{:08x}", hash >> 32)
    }

    /// The most devices any run trains on (`--devices`, or the largest of `--vary devices`).
    fn most_devices(&self) -> Result<usize> {
        let mut most = 1;
        for setting in vary::settings(&self.vary) {
            most = most.max(self.train.with_setting(&setting)?.devices);
        }
        Ok(most)
    }

    /// Refuses a plan whose data set and models would not fit in `available` bytes of memory,
    /// before anything is allocated (a too-large allocation aborts the process).
    pub fn check_memory(&self, jobs: usize, available: u128) -> Result<()> {
        let model: ModelConfig = self.train.model.parse()?;
        let (c, side, classes, images) = self.dataset.shape();
        // A batch larger than the data set is refused later, by name; here it counts as whole.
        let devices = self.most_devices().unwrap_or(self.train.devices);
        let batch = self.batch_sizes.iter().copied().max().unwrap_or(1) * devices;
        let batch = (batch.max(self.train.large_eval_batch) as u128).min(images) as usize;
        let per_job = model.training_bytes(c, side, classes, batch);
        let need = self.dataset.bytes() + jobs as u128 * per_job;
        let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
        ensure!(
            need <= available,
            "--dataset {} with --model {} at batch size {batch} on {jobs} job(s) needs about \
             {:.1} GiB ({:.1} GiB of images, {:.1} GiB per job), but {:.1} GiB of memory is \
             available; use fewer or smaller images, a narrower model, or fewer --jobs",
            self.dataset,
            model,
            gib(need),
            gib(self.dataset.bytes()),
            gib(per_job),
            gib(available)
        );
        Ok(())
    }

    /// Checks everything that could fail before any training: batch sizes against the data set
    /// and the normalizers, and that every normalizer fits every layer of the model.
    pub fn validate(&self, ds: &Dataset) -> Result<()> {
        ensure!(!self.batch_sizes.is_empty(), "--batch-sizes is empty");
        ensure!(!self.seeds.is_empty(), "--seeds is empty");
        let has_repeats = |v: Vec<u64>| {
            let n = v.len();
            let mut sorted = v;
            sorted.sort_unstable();
            sorted.dedup();
            sorted.len() != n
        };
        ensure!(
            !has_repeats(self.seeds.clone()),
            "--seeds names a seed twice: {:?}",
            self.seeds
        );
        ensure!(
            !has_repeats(self.batch_sizes.iter().map(|&b| b as u64).collect()),
            "--batch-sizes names a batch size twice: {:?}",
            self.batch_sizes
        );
        for setting in vary::settings(&self.vary) {
            let t = self.train.with_setting(&setting)?;
            let checked = check_train(&t);
            if setting.is_empty() {
                checked?;
            } else {
                checked.with_context(|| format!("with --vary {}", vary::label(&setting)))?;
            }
        }
        let d = self.most_devices()?;
        for &b in &self.batch_sizes {
            ensure!(
                b >= 1,
                "batch size 0 is not a batch size; use --batch-sizes 32,16,8,4,2"
            );
            ensure!(
                b <= ds.train.len(),
                "batch size {b} is larger than the training set ({} images)",
                ds.train.len()
            );
            ensure!(
                b * d <= ds.train.len(),
                "batch size {b} on {d} devices takes {} images a step, more than the training \
                 set ({} images); use fewer --devices or smaller --batch-sizes",
                b * d,
                ds.train.len()
            );
            for norm in &self.norms {
                let spec: NormSpec = crate::model::split_ws(norm).0.parse()?;
                ensure!(
                    !(b == 1 && spec.uses_batch_statistics()),
                    "batch size 1 with {norm}: BatchNorm needs at least 2 images per batch to \
                     take batch statistics; drop 1 from --batch-sizes or {norm} from --norms"
                );
            }
        }
        let model: ModelConfig = self.train.model.parse()?;
        let conv: conv::ConvImpl = self.train.conv.parse()?;
        for norm in &self.norms {
            ResNet::new(
                model,
                ds.channels,
                ds.classes,
                norm,
                conv,
                &VarMap::new(),
                0,
            )
            .with_context(|| format!("--norms {norm} does not fit --model {model}"))?;
        }
        Ok(())
    }
}

/// Refuses training settings no run could use.
fn check_train(t: &TrainConfig) -> Result<()> {
    ensure!(t.epochs >= 1, "--epochs must be at least 1");
    ensure!(
        t.devices >= 1,
        "--devices 0 trains nothing; give at least 1 (1: one batch per step)"
    );
    ensure!(
        t.base_lr.is_finite() && t.base_lr > 0.0,
        "--base-lr must be a positive number, got {}",
        t.base_lr
    );
    ensure!(
        t.weight_decay.is_finite() && t.weight_decay >= 0.0,
        "--weight-decay must be a number >= 0, got {}",
        t.weight_decay
    );
    ensure!(
        t.warmup_epochs.is_finite() && t.warmup_epochs >= 0.0,
        "--warmup-epochs must be a number >= 0, got {}",
        t.warmup_epochs
    );
    ensure!(
        t.warmup_epochs <= t.epochs as f64,
        "--warmup-epochs {} is longer than the run (--epochs {}); give at most {}",
        t.warmup_epochs,
        t.epochs,
        t.epochs
    );
    Ok(())
}

enum Event {
    Started(RunKey),
    Epoch(EpochRow),
    Finished(Result<(RunRow, Vec<EpochRow>)>, RunKey),
}

/// Prints a line above the progress bar, or plainly where the bar is hidden (no terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn describe(k: &RunKey) -> String {
    format!("{} B={} seed={}", k.norm, k.batch_size, k.seed)
}

/// The message of a panic's payload.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Trains one run; a panic in it becomes an error that names it, so that the sweep stops
/// cleanly (finished runs kept, the failure in the manifest) instead of aborting.
fn run_caught(
    key: &RunKey,
    cfg: &TrainConfig,
    ds: &Dataset,
    on_epoch: impl FnMut(&EpochRow),
) -> Result<(RunRow, Vec<EpochRow>)> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // A way for tests to make one run fail as a bug would: NORMBENCH_PANIC_IN_RUN=norm,B,seed.
        if let Ok(which) = std::env::var("NORMBENCH_PANIC_IN_RUN") {
            if which == format!("{},{},{}", key.norm, key.batch_size, key.seed) {
                panic!("NORMBENCH_PANIC_IN_RUN asked this run to panic");
            }
        }
        train::run(key, &cfg.with_setting(&key.vary)?, ds, on_epoch)
    }))
    .unwrap_or_else(|payload| bail!("panicked: {}", panic_message(payload)))
}

/// The runs of the plan not yet finished in `out` (after a repair; diverged runs count as
/// unfinished with `retry_diverged`), in the plan's order.
fn pending(plan: &Plan, out: &Path, retry_diverged: bool) -> Result<VecDeque<RunKey>> {
    let keys = plan.keys();
    let kept = if retry_diverged {
        results::forget_diverged(out, &keys)?
    } else {
        results::repair(out, &keys)?
    };
    let finished = results::finished(&kept);
    Ok(plan
        .runs()
        .into_iter()
        .filter(|k| !finished.contains(k))
        .collect())
}

type Queue = Arc<Mutex<VecDeque<RunKey>>>;

/// `jobs` threads, each on a rayon pool of `threads` threads, training runs from `queue` until
/// it is empty and reporting to `tx`.
fn spawn_workers(
    jobs: usize,
    threads: usize,
    queue: &Queue,
    tx: mpsc::Sender<Event>,
    ds: Arc<Dataset>,
    cfg: &TrainConfig,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    (0..jobs)
        .map(|_| {
            let (queue, tx, ds, cfg) = (queue.clone(), tx.clone(), ds.clone(), cfg.clone());
            std::thread::spawn(move || -> Result<()> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?;
                loop {
                    let next = queue
                        .lock()
                        .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                        .pop_front();
                    let Some(key) = next else { return Ok(()) };
                    let _ = tx.send(Event::Started(key.clone()));
                    let etx = tx.clone();
                    let result = pool.install(|| {
                        run_caught(&key, &cfg, &ds, |e| {
                            let _ = etx.send(Event::Epoch(e.clone()));
                        })
                    });
                    let _ = tx.send(Event::Finished(result, key));
                }
            })
        })
        .collect()
}

fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs  {elapsed_precise} elapsed, ETA {eta_precise}  {msg}",
        )
        .expect("static template"),
    );
    bar
}

fn epoch_line(e: &EpochRow) -> String {
    let key = e.key();
    format!(
        "{} epoch {}: lr {:.4}, train loss {:.4}, test error {:.2}%",
        describe(&key),
        e.epoch,
        e.lr,
        e.train_loss,
        e.test_error
    )
}

/// Records each run as it finishes, until every worker is done; the number of runs recorded
/// and the first failure. A failure stops handing out runs; those in flight finish and are kept.
fn record_events(
    rx: mpsc::Receiver<Event>,
    queue: &Queue,
    out: &Path,
    verbose: bool,
    bar: &ProgressBar,
) -> Result<(usize, Option<anyhow::Error>)> {
    let (mut running, mut failure, mut done) = (Vec::<RunKey>::new(), None, 0);
    for event in rx {
        match event {
            Event::Started(k) => running.push(k),
            Event::Epoch(e) if verbose => say(bar, epoch_line(&e)),
            Event::Epoch(_) => {}
            Event::Finished(result, key) => {
                running.retain(|k| k != &key);
                match result
                    .and_then(|(row, epochs)| results::record_run(out, &row, &epochs).map(|_| row))
                {
                    Ok(row) => {
                        done += 1;
                        let status = if row.diverged {
                            "diverged".to_string()
                        } else {
                            format!("{:.2}% error", row.test_error)
                        };
                        let line =
                            format!("{}: {status} in {:.0}s", describe(&key), row.wall_seconds);
                        say(bar, line);
                    }
                    Err(e) => {
                        queue
                            .lock()
                            .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                            .clear();
                        failure.get_or_insert(e.context(format!("run {} failed", describe(&key))));
                    }
                }
                bar.inc(1);
            }
        }
        bar.set_message(running.iter().map(describe).collect::<Vec<_>>().join(", "));
    }
    bar.finish_and_clear();
    Ok((done, failure))
}

/// Waits for the workers; the first failure among `failure` and theirs.
fn join_workers(
    workers: Vec<std::thread::JoinHandle<Result<()>>>,
    mut failure: Option<anyhow::Error>,
) -> Option<anyhow::Error> {
    for w in workers {
        let joined = w
            .join()
            .map_err(|p| anyhow::anyhow!("a worker panicked: {}", panic_message(p)))
            .and_then(|r| r);
        if let Err(e) = joined {
            failure.get_or_insert(e);
        }
    }
    failure
}

/// Runs the plan into `out`, skipping runs already finished there (and those that diverged,
/// unless `retry_diverged`).
pub fn run(
    plan: &Plan,
    ds: Dataset,
    out: &Path,
    jobs: usize,
    verbose: bool,
    retry_diverged: bool,
) -> Result<()> {
    plan.validate(&ds)?;
    let _lock = results::lock_folder(out)?;
    check_settings(out, &plan.settings())?;
    let todo = pending(plan, out, retry_diverged)?;
    let total = plan.runs().len();
    let skipped = total - todo.len();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let jobs = jobs.clamp(1, todo.len().max(1));
    let threads_per_job = (cpus / jobs).max(1);
    // candle's matmul sizes its own thread split from RAYON_NUM_THREADS at every call, not from
    // the pool it runs in: without this, each job's matmuls would split for all the CPUs.
    std::env::set_var("RAYON_NUM_THREADS", threads_per_job.to_string());
    let manifest = Manifest::start(plan.manifest_fields(), jobs, threads_per_job, total);
    let write_manifest = |end: Option<&str>, done: usize, failure: Option<&str>| -> Result<()> {
        let m = manifest.json(end, done, failure);
        write_atomic(&out.join(MANIFEST_JSON), &serde_json::to_vec_pretty(&m)?)
    };
    write_manifest(None, skipped, None)?;
    eprintln!(
        "sweep into {}: {total} runs ({skipped} already finished, {} to run) on {jobs} job(s) × \
         {threads_per_job} thread(s)",
        out.display(),
        todo.len()
    );

    let bar = progress_bar(todo.len());
    let queue: Queue = Arc::new(Mutex::new(todo));
    let (tx, rx) = mpsc::channel::<Event>();
    let workers = spawn_workers(jobs, threads_per_job, &queue, tx, Arc::new(ds), &plan.train);
    let (recorded, failure) = record_events(rx, &queue, out, verbose, &bar)?;
    let failure = join_workers(workers, failure);
    let done = skipped + recorded;
    let failed = failure.as_ref().map(|e| format!("{e:#}"));
    write_manifest(Some(&now()), done, failed.as_deref())?;
    if let Some(e) = failure {
        return Err(e.context(format!(
            "the sweep stopped; {done} finished runs are kept in {} (rerun the same command to \
             resume)",
            out.display()
        )));
    }
    report::report(out, None)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Combines the finished runs of shard folders `sources` into `out` and rebuilds its reports.
pub fn merge(out: &Path, sources: &[PathBuf]) -> Result<()> {
    ensure!(!sources.is_empty(), "merge needs at least one shard folder");
    let mut locks = vec![results::lock_folder(out)?];
    for src in sources {
        ensure!(
            src.join(MANIFEST_JSON).is_file(),
            "{} is not a sweep folder (no {MANIFEST_JSON})",
            src.display()
        );
        if src != out {
            locks.push(results::lock_folder(src)?);
        }
    }
    let mut settings: Option<serde_json::Value> = None;
    let mut manifest_of_first = None;
    let (mut runs, mut epochs): (Vec<RunRow>, Vec<EpochRow>) = (Vec::new(), Vec::new());
    for src in sources {
        let path = src.join(MANIFEST_JSON);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} is not a sweep folder (no {MANIFEST_JSON})",
                src.display()
            )
        })?;
        let m: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        match &settings {
            None => settings = Some(m["settings"].clone()),
            Some(s) if *s != m["settings"] => bail!(
                "{} was swept with other settings than {}; merge only shards of one sweep",
                src.display(),
                sources[0].display()
            ),
            Some(_) => {}
        }
        manifest_of_first.get_or_insert(m);
        let keys = results::varied_keys(src)?;
        results::repair(src, &keys)?;
        runs.extend(results::read_rows::<RunRow>(
            &src.join(results::RUNS_CSV),
            &keys,
        )?);
        epochs.extend(results::read_rows::<EpochRow>(
            &src.join(results::EPOCHS_CSV),
            &keys,
        )?);
    }
    std::fs::create_dir_all(out)?;
    let keys: Vec<String> = settings
        .as_ref()
        .and_then(|s| serde_json::from_value(s["vary"].clone()).ok())
        .unwrap_or_default();
    if out.join(MANIFEST_JSON).is_file() {
        ensure!(
            results::varied_keys(out)? == keys,
            "{} holds a sweep with other --vary keys; merge into a new folder",
            out.display()
        );
    }
    let existing: Vec<RunRow> = results::repair(out, &keys)?;
    let mut seen = results::finished(&existing);
    let mut merged = existing;
    let new: Vec<RunRow> = runs.into_iter().filter(|r| seen.insert(r.key())).collect();
    let new_keys = results::finished(&new);
    merged.extend(new);
    let mut all_epochs: Vec<EpochRow> = results::read_rows(&out.join(results::EPOCHS_CSV), &keys)?;
    all_epochs.extend(epochs.into_iter().filter(|e| new_keys.contains(&e.key())));
    write_atomic(
        &out.join(results::EPOCHS_CSV),
        &results::to_csv(&all_epochs, true)?,
    )?;
    write_atomic(
        &out.join(results::RUNS_CSV),
        &results::to_csv(&merged, true)?,
    )?;
    let mut manifest = manifest_of_first.unwrap_or_default();
    manifest["merged_from"] = json!(sources
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>());
    manifest["shard"] = serde_json::Value::Null;
    manifest["runs_finished"] = json!(merged.len());
    write_atomic(
        &out.join(MANIFEST_JSON),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    report::report(out, None)?;
    eprintln!("merged {} runs into {}", merged.len(), out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_split_on_commas_that_start_a_new_spec() {
        assert_eq!(
            parse_norms(
                "bn, gn:groups=8,eps=1e-3,LAYER,in:track_running_stats=true",
                8
            )
            .unwrap(),
            [
                "bn",
                "gn:groups=8,eps=1e-3",
                "ln",
                "in:track_running_stats=true"
            ]
        );
        assert!(parse_norms("bn,batch", 8)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let e = format!("{:#}", parse_norms("bn,bx", 8).unwrap_err());
        assert!(e.contains("unknown normalizer \"bx\""), "{e}");
    }

    #[test]
    fn grouped_layers_take_the_model_s_groups_and_ws_stays_in_the_name() {
        let remedies = "none,bn,brn,ghostbn:virtual=2,gn,gn+ws,GN:eps=1e-3+WS,frn,evonorm-s0,\
                        evonorm-b0,ln,rms,gn:groups=4";
        assert_eq!(
            parse_norms(remedies, 8).unwrap(),
            [
                "none",
                "bn",
                "brn",
                "ghostbn:virtual=2",
                "gn:groups=8",
                "gn:groups=8+ws",
                "gn:groups=8,eps=1e-3+ws",
                "frn",
                "evonorm-s0:groups=8",
                "evonorm-b0",
                "ln",
                "rms",
                "gn:groups=4",
            ]
        );
        assert!(parse_norms("gn+ws,gn:groups=8+ws", 8)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let e = format!("{:#}", parse_norms("ghostbn", 8).unwrap_err());
        assert!(e.contains("virtual=K"), "{e}");
    }

    #[test]
    fn shards_partition_the_runs() {
        assert_eq!(parse_shard("2/4").unwrap(), (2, 4));
        for bad in ["3/2", "0/2", "1/0", "x/2", "2"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        let mut plan = Plan {
            norms: vec!["bn".into(), "gn".into()],
            batch_sizes: vec![32, 2],
            seeds: vec![0, 1, 2],
            dataset: "synthetic".parse().unwrap(),
            train: TrainConfig::for_tests(),
            vary: Vec::new(),
            shard: None,
        };
        let all = plan.runs();
        assert_eq!(all.len(), 12);
        let mut union = Vec::new();
        for i in 1..=3 {
            plan.shard = Some((i, 3));
            union.extend(plan.runs());
        }
        union.sort();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(union, sorted);
    }
}
