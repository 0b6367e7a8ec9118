//! The `experiments` binary end to end: a quick sweep and every file it writes, resuming after
//! a crash, sharding and merging, real data-set formats, and bad arguments.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

fn experiments(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the binary runs")
}

/// The output of a run that must succeed.
fn succeeds(args: &[&str]) -> Output {
    let out = experiments(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{stderr}");
    out
}

/// The messages (stderr) of a run that must succeed.
fn ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&succeeds(args).stderr).to_string()
}

/// The printed tables (stdout) of a run that must succeed.
fn printed(args: &[&str]) -> String {
    String::from_utf8_lossy(&succeeds(args).stdout).to_string()
}

fn fails(args: &[&str]) -> String {
    let out = experiments(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// runs.csv without the wall_seconds column, sorted: the numbers a rerun must reproduce.
fn numbers(dir: &Path) -> Vec<String> {
    let text = read(dir, "runs.csv");
    let mut lines: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f.remove(10);
            f.join(",")
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn quick_sweep_writes_every_file_and_resumes_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("quick");
    let o = out.to_str().unwrap();
    ok(&["sweep", "--quick", "--out", o]);

    let runs = read(&out, "runs.csv");
    let header = runs.lines().next().unwrap();
    for col in [
        "norm",
        "batch_size",
        "seed",
        "lr",
        "epochs",
        "steps",
        "test_error",
        "test_error_batch_stats",
        "test_error_large_batch_stats",
        "train_loss",
        "wall_seconds",
        "diverged",
    ] {
        assert!(
            header.split(',').any(|c| c == col),
            "runs.csv lacks {col}: {header}"
        );
    }
    assert_eq!(runs.lines().count(), 5, "header and 4 runs:\n{runs}");
    for line in runs.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let err: f64 = f[6].parse().unwrap();
        assert!((0.0..=100.0).contains(&err), "{line}");
        assert_eq!(f[11], "false", "{line}");
    }
    assert!(
        runs.contains("\nbn,8,0,0.025,1,64,"),
        "lr = 0.1·8/32 and 512/8 steps:\n{runs}"
    );
    assert_eq!(read(&out, "epochs.csv").lines().count(), 5);
    let summary = read(&out, "summary.csv");
    assert!(
        summary.starts_with("norm,batch_size,n,test_error_mean,test_error_std,"),
        "{summary}"
    );
    assert_eq!(summary.lines().count(), 5);
    let manifest: serde_json::Value = serde_json::from_str(&read(&out, "manifest.json")).unwrap();
    for key in [
        "settings",
        "norms",
        "batch_sizes",
        "seeds",
        "versions",
        "git_commit",
        "threads_per_job",
        "os",
        "cpu",
        "start_time",
        "end_time",
    ] {
        assert!(!manifest[key].is_null(), "manifest lacks {key}: {manifest}");
    }
    assert_eq!(
        manifest["versions"]["candle-core"]
            .as_str()
            .unwrap()
            .split('.')
            .next(),
        Some("0")
    );
    let md = read(&out, "summary.md");
    assert!(
        md.contains("| normalizer | B=8 | B=2 |") && md.contains("| `gn:groups=8` |"),
        "{md}"
    );
    assert!(read(&out, "summary.tex").contains("\\begin{tabular}{lrr}"));
    let svg = read(&out, "error_vs_batch.svg");
    assert!(svg.contains("<svg") && svg.contains("gn:groups=8") && svg.contains("batch size"));
    let png = std::fs::read(out.join("error_vs_batch.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);

    // Running it again finds everything done and changes nothing.
    let before = numbers(&out);
    let again = ok(&["sweep", "--quick", "--out", o]);
    assert!(again.contains("4 already finished, 0 to run"), "{again}");
    assert_eq!(numbers(&out), before);

    // A crash mid-write: the last row is half there. The rerun repeats that run only.
    let path = out.join("runs.csv");
    let text = read(&out, "runs.csv");
    let cut = text.trim_end().rfind('\n').unwrap() + 12;
    std::fs::write(&path, &text[..cut]).unwrap();
    let resumed = ok(&["sweep", "--quick", "--out", o]);
    assert!(
        resumed.contains("3 already finished, 1 to run"),
        "{resumed}"
    );
    assert_eq!(
        numbers(&out),
        before,
        "same numbers as the uninterrupted sweep"
    );
    assert_eq!(
        read(&out, "epochs.csv").lines().count(),
        5,
        "no duplicated epoch rows"
    );

    // Other settings in the same folder are refused.
    let e = fails(&["sweep", "--quick", "--epochs", "2", "--out", o]);
    assert!(e.contains("holds a sweep with other settings"), "{e}");
}

#[test]
fn shards_merge_into_the_unsharded_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    ok(&["sweep", "--quick", "--out", dir("all").to_str().unwrap()]);
    ok(&[
        "sweep",
        "--quick",
        "--shard",
        "1/2",
        "--out",
        dir("s1").to_str().unwrap(),
    ]);
    ok(&[
        "sweep",
        "--quick",
        "--shard",
        "2/2",
        "--out",
        dir("s2").to_str().unwrap(),
    ]);
    assert_eq!(numbers(&dir("s1")).len(), 2);
    ok(&[
        "merge",
        "--out",
        dir("merged").to_str().unwrap(),
        dir("s1").to_str().unwrap(),
        dir("s2").to_str().unwrap(),
    ]);
    assert_eq!(numbers(&dir("merged")), numbers(&dir("all")));
    assert!(dir("merged").join("error_vs_batch.svg").exists());
    std::fs::remove_file(dir("merged").join("summary.csv")).unwrap();
    ok(&["report", dir("merged").to_str().unwrap()]);
    assert_eq!(
        read(&dir("merged"), "summary.csv"),
        read(&dir("all"), "summary.csv")
    );
}

#[test]
fn a_diverging_run_is_recorded_and_the_sweep_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("div");
    ok(&[
        "sweep",
        "--quick",
        "--base-lr",
        "1e30",
        "--norms",
        "gn:groups=8",
        "--out",
        out.to_str().unwrap(),
    ]);
    let runs = read(&out, "runs.csv");
    assert_eq!(runs.lines().count(), 3);
    assert!(
        runs.lines()
            .skip(1)
            .all(|l| l.ends_with(",true,") && l.contains("NaN")),
        "{runs}"
    );
    assert!(read(&out, "summary.md").contains("diverged"));
}

fn write_gz(path: &Path, bytes: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap();
}

fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

#[test]
fn mnist_and_cifar10_files_load_from_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let mnist = tmp.path().join("mnist");
    std::fs::create_dir(&mnist).unwrap();
    let pixels = |n: usize, len: usize| {
        (0..n * len)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>()
    };
    let labels = |n: usize| (0..n).map(|i| (i % 10) as u8).collect::<Vec<u8>>();
    write_gz(
        &mnist.join("train-images-idx3-ubyte.gz"),
        &idx(0x803, &[40, 28, 28], &pixels(40, 784)),
    );
    write_gz(
        &mnist.join("train-labels-idx1-ubyte.gz"),
        &idx(0x801, &[40], &labels(40)),
    );
    std::fs::write(
        mnist.join("t10k-images-idx3-ubyte"),
        idx(0x803, &[10, 28, 28], &pixels(10, 784)),
    )
    .unwrap();
    std::fs::write(
        mnist.join("t10k-labels-idx1-ubyte"),
        idx(0x801, &[10], &labels(10)),
    )
    .unwrap();
    let spec = format!("mnist:{}", mnist.display());
    let out = tmp.path().join("m");
    ok(&[
        "sweep",
        "--quick",
        "--dataset",
        &spec,
        "--batch-sizes",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(read(&out, "runs.csv").contains("\nbn,4,0,0.0125,1,10,"));

    let cifar = tmp.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&cifar).unwrap();
    let records = |n: usize| {
        (0..n)
            .flat_map(|i| {
                std::iter::once((i % 10) as u8).chain((0..3072).map(move |j| ((i + j) % 256) as u8))
            })
            .collect::<Vec<u8>>()
    };
    for i in 1..=5 {
        std::fs::write(cifar.join(format!("data_batch_{i}.bin")), records(8)).unwrap();
    }
    std::fs::write(cifar.join("test_batch.bin"), records(6)).unwrap();
    let spec = format!("cifar10:{}", tmp.path().display());
    let out = tmp.path().join("c");
    ok(&[
        "sweep",
        "--quick",
        "--dataset",
        &spec,
        "--batch-sizes",
        "4",
        "--norms",
        "gn:groups=8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(read(&out, "runs.csv").contains("\ngn:groups=8,4,0,0.0125,1,10,"));

    // Broken files get errors that name them.
    std::fs::write(
        mnist.join("t10k-labels-idx1-ubyte"),
        idx(0x801, &[10], &labels(9)),
    )
    .unwrap();
    let e = fails(&[
        "sweep",
        "--quick",
        "--dataset",
        &format!("mnist:{}", mnist.display()),
    ]);
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("header says 10 labels"),
        "{e}"
    );
    std::fs::write(cifar.join("test_batch.bin"), vec![0u8; 100]).unwrap();
    let e = fails(&[
        "sweep",
        "--quick",
        "--dataset",
        &format!("cifar10:{}", cifar.display()),
    ]);
    assert!(
        e.contains("test_batch.bin") && e.contains("not a whole number of 3073-byte"),
        "{e}"
    );
    let e = fails(&[
        "sweep",
        "--quick",
        "--dataset",
        &format!("mnist:{}", tmp.path().join("nope").display()),
    ]);
    assert!(e.contains("no such folder"), "{e}");
    std::fs::remove_file(mnist.join("train-images-idx3-ubyte.gz")).unwrap();
    let e = fails(&[
        "sweep",
        "--quick",
        "--dataset",
        &format!("mnist:{}", mnist.display()),
    ]);
    assert!(
        e.contains("has no train-images-idx3-ubyte (plain or .gz)"),
        "{e}"
    );
}

/// runs.csv's numbers (as `numbers`) with the column `key` kept at its header's place.
fn column(dir: &Path, key: &str) -> Vec<String> {
    let text = read(dir, "runs.csv");
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let i = header
        .iter()
        .position(|h| *h == key)
        .unwrap_or_else(|| panic!("no {key}"));
    let mut v: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(i).unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_varied_setting_is_a_column_and_resumes_shards_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| tmp.path().join(n);
    let sweep = |name: &str, more: &[&str]| {
        let mut args = vec![
            "sweep",
            "--quick",
            "--norms",
            "bn",
            "--vary",
            "base-lr=0.05,0.2",
            "--vary",
            "dropout=0,0.5",
            "--out",
        ];
        let out = dir(name);
        args.push(out.to_str().unwrap());
        args.extend(more);
        ok(&args)
    };
    sweep("all", &[]);
    let all = dir("all");
    // 2 batch sizes × 2 rates × 2 dropouts; the rate shows in lr = base-lr·B/32 too.
    assert_eq!(numbers(&all).len(), 8);
    assert_eq!(
        column(&all, "base-lr"),
        ["0.05", "0.05", "0.05", "0.05", "0.2", "0.2", "0.2", "0.2"]
    );
    assert_eq!(
        column(&all, "dropout")
            .iter()
            .filter(|v| *v == "0.5")
            .count(),
        4
    );
    for line in read(&all, "runs.csv").lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (b, lr, base): (f64, f64, f64) = (
            f[1].parse().unwrap(),
            f[3].parse().unwrap(),
            f[13].parse().unwrap(),
        );
        assert!((lr - base * b / 32.0).abs() < 1e-12, "{line}");
    }
    assert!(read(&all, "epochs.csv")
        .lines()
        .next()
        .unwrap()
        .ends_with(",base-lr,dropout"));
    let summary = read(&all, "summary.md");
    assert!(
        summary.contains("| normalizer | base-lr=0.05 | base-lr=0.2 |"),
        "{summary}"
    );
    assert!(summary.contains("dropout=0.5:"), "{summary}");
    assert!(all.join("error_vs_base-lr.svg").exists() && all.join("curves.svg").exists());
    let manifest = read(&all, "manifest.json");
    assert!(
        manifest.contains("\"vary\": [\n      \"base-lr\",\n      \"dropout\""),
        "{manifest}"
    );
    // Resume: nothing left to run. Another set of keys is another sweep.
    assert!(sweep("all", &[]).contains("8 already finished, 0 to run"));
    let e = fails(&[
        "sweep",
        "--quick",
        "--norms",
        "bn",
        "--vary",
        "base-lr=0.05",
        "--out",
        all.to_str().unwrap(),
    ]);
    assert!(e.contains("holds a sweep with other settings"), "{e}");
    // Shards merge into the unsharded sweep's numbers.
    sweep("s1", &["--shard", "1/3"]);
    sweep("s2", &["--shard", "2/3"]);
    sweep("s3", &["--shard", "3/3"]);
    let (s1, s2, s3, merged) = (dir("s1"), dir("s2"), dir("s3"), dir("merged"));
    ok(&[
        "merge",
        "--out",
        merged.to_str().unwrap(),
        s1.to_str().unwrap(),
        s2.to_str().unwrap(),
        s3.to_str().unwrap(),
    ]);
    assert_eq!(numbers(&merged), numbers(&all));
    assert_eq!(read(&merged, "summary.csv"), read(&all, "summary.csv"));
    // Curves of one setting.
    let e = ok(&[
        "curves",
        all.to_str().unwrap(),
        "--where",
        "base-lr=0.2",
        "--batch-size",
        "2",
    ]);
    assert!(all.join("curves_B2_base-lr-0.2.svg").exists(), "{e}");
    let e = fails(&["curves", all.to_str().unwrap(), "--where", "momentum=0.9"]);
    assert!(e.contains("the sweep does not vary momentum"), "{e}");
}

#[test]
fn bad_arguments_fail_before_any_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("never");
    let o = out.to_str().unwrap();
    for (args, msg) in [
        (vec!["--norms", "bn,bx"], "unknown normalizer \"bx\""),
        (
            vec!["--norms", "gn:groups=3"],
            "does not divide num_channels=16",
        ),
        (vec!["--batch-sizes", "8,1"], "batch size 1 with bn"),
        (vec!["--batch-sizes", "0"], "batch size 0"),
        (vec!["--batch-sizes", "8,2,8"], "names a batch size twice"),
        (vec!["--seeds", "1,1"], "names a seed twice"),
        (
            vec!["--batch-sizes", "100000"],
            "larger than the training set",
        ),
        (vec!["--devices", "0"], "--devices 0 trains nothing"),
        (
            vec!["--vary", "devices=1,4000", "--batch-sizes", "2"],
            "on 4000 devices takes 8000 images a step",
        ),
        (
            vec!["--devices", "4000", "--batch-sizes", "2"],
            "on 4000 devices takes 8000 images a step",
        ),
        (vec!["--shard", "3/2"], "--shard \"3/2\" is not i/n"),
        (vec!["--model", "resnet:width=12"], "must divide width=12"),
        (vec!["--conv", "cudnn"], "unknown convolution"),
        (vec!["--dataset", "imagenet"], "unknown data set"),
        (vec!["--vary", "lr=0.1"], "--vary: unknown key \"lr\""),
        (vec!["--vary", "base-lr="], "--vary base-lr= has no values"),
        (
            vec!["--vary", "dropout=0", "--vary", "dropout=0.3"],
            "--vary dropout is given twice",
        ),
        (
            vec!["--vary", "base-lr=0.1,-0.2"],
            "--vary base-lr=-0.2 is out of range",
        ),
        (
            vec!["--vary", "dropout=0,1"],
            "--vary dropout=1 is out of range",
        ),
        (
            vec!["--vary", "epochs=1,2", "--warmup-epochs", "2"],
            "--warmup-epochs 2 is longer than the run (--epochs 1)",
        ),
        (
            vec!["--model", "resnet:dropout=1.5"],
            "dropout must be in [0, 1)",
        ),
    ] {
        let mut full = vec!["sweep", "--quick", "--out", o];
        full.extend(args.iter());
        let e = fails(&full);
        assert!(e.contains(msg), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?} created the output folder");
    }
    let e = fails(&["report", o]);
    assert!(e.contains("is not a folder"), "{e}");
    // Inputs that used to run as something else, mark every run diverged, or abort on an
    // allocation: refused before any training, naming the problem.
    for (args, msg) in [
        (vec!["--jobs", "0"], "--jobs 0 runs nothing"),
        (
            vec!["--weight-decay", "NaN"],
            "--weight-decay must be a number >= 0",
        ),
        (
            vec!["--weight-decay=-1e-4"],
            "--weight-decay must be a number >= 0",
        ),
        (
            vec!["--base-lr=-0.1"],
            "--base-lr must be a positive number",
        ),
        (
            vec!["--warmup-epochs", "2"],
            "longer than the run (--epochs 1)",
        ),
        (
            vec!["--warmup-epochs", "NaN"],
            "--warmup-epochs must be a number >= 0",
        ),
        (
            vec!["--dataset", "synthetic:train=1000000000000"],
            "GiB of memory is available",
        ),
        (
            vec!["--model", "resnet:width=100000"],
            "GiB of memory is available",
        ),
    ] {
        let mut full = vec!["sweep", "--quick", "--out", o];
        full.extend(args.iter());
        let e = fails(&full);
        assert!(e.contains(msg), "{args:?}: {e}");
        assert!(!out.exists(), "{args:?} created the output folder");
    }
    for (args, msg) in [
        (
            vec!["--batch-sizes", "0"],
            "every batch size must be at least 1",
        ),
        (vec!["--threads", "0"], "--threads 0 runs nothing"),
    ] {
        let mut full = vec!["bench-conv", "--min-time", "0"];
        full.extend(args.iter());
        let e = fails(&full);
        assert!(e.contains(msg), "{args:?}: {e}");
    }
}

/// A sweep of one step with a rate so large that the step itself leaves non-finite weights.
fn one_step_sweep(out: &Path, more: &[&str]) -> Output {
    let mut args = vec![
        "sweep",
        "--dataset",
        "synthetic:train=8,test=8",
        "--batch-sizes",
        "8",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--base-lr",
        "1e300",
        "--norms",
        "gn:groups=8",
        "--seeds",
        "0",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    experiments(&args)
}

#[test]
fn nan_after_the_last_step_is_divergence_and_retried_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("last-step");
    assert!(one_step_sweep(&out, &[]).status.success());
    let runs = read(&out, "runs.csv");
    let row = runs.lines().nth(1).unwrap();
    // Diverged: no PreciseBN column either (the last field, empty).
    assert!(row.ends_with(",true,") && row.contains("NaN"), "{runs}");
    // Resuming keeps the diverged run as a result; --retry-diverged trains it again.
    let again = one_step_sweep(&out, &[]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 to run"));
    let retried = one_step_sweep(&out, &["--retry-diverged"]);
    let e = String::from_utf8_lossy(&retried.stderr);
    assert!(retried.status.success() && e.contains("1 to run"), "{e}");
    assert_eq!(
        read(&out, "runs.csv").lines().count(),
        2,
        "one row, not two"
    );

    // `report` reads a damaged folder as a repair would, and changes nothing on disk.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(out.join("runs.csv"))
        .unwrap();
    f.write_all(format!("{row}\ngn:groups=8,8,1,0.1").as_bytes())
        .unwrap();
    drop(f);
    let damaged = read(&out, "runs.csv");
    ok(&["report", out.to_str().unwrap()]);
    assert_eq!(read(&out, "runs.csv"), damaged);
    let summary = read(&out, "summary.csv");
    let n_diverged = summary.lines().nth(1).unwrap().split(',').nth(7).unwrap();
    assert_eq!(
        n_diverged, "1",
        "the duplicate row is not counted:\n{summary}"
    );
}

#[test]
fn a_panicking_run_stops_the_sweep_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("panic");
    let args = [
        "sweep",
        "--quick",
        "--jobs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env("NORMBENCH_PANIC_IN_RUN", "gn:groups=8,2,0")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{e}");
    assert!(e.contains("run gn:groups=8 B=2 seed=0 failed"), "{e}");
    assert!(e.contains("3 finished runs are kept"), "{e}");
    assert_eq!(
        read(&out, "runs.csv").lines().count(),
        4,
        "header and 3 runs"
    );
    let manifest: serde_json::Value = serde_json::from_str(&read(&out, "manifest.json")).unwrap();
    let failure = manifest["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("panicked"), "{manifest}");
    // Resuming trains only the run that failed.
    let e = ok(&args);
    assert!(e.contains("3 already finished, 1 to run"), "{e}");
    let manifest: serde_json::Value = serde_json::from_str(&read(&out, "manifest.json")).unwrap();
    assert!(manifest["failure"].is_null(), "{manifest}");
}

#[test]
fn one_writer_per_folder_and_kill_9_leaves_no_stale_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("busy");
    let o = out.to_str().unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_experiments"))
        .args([
            "sweep", "--quick", "--jobs", "1", "--epochs", "20", "--out", o,
        ])
        .env_remove("RUST_BACKTRACE")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    let lock = out.join(".normbench.lock");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&lock)
        .map(|s| s.trim() != pid)
        .unwrap_or(true)
    {
        assert!(
            started.elapsed().as_secs() < 30,
            "the first sweep never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let merged = tmp.path().join("merged");
    for args in [
        vec![
            "sweep", "--quick", "--jobs", "1", "--epochs", "20", "--out", o,
        ],
        vec!["report", o],
        vec!["merge", "--out", merged.to_str().unwrap(), o],
    ] {
        let e = fails(&args);
        assert!(
            e.contains("in use by another normbench process"),
            "{args:?}: {e}"
        );
        assert!(e.contains(&format!("pid {pid}")), "{args:?}: {e}");
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The lock died with its holder: the folder can be taken again at once.
    let e = String::from_utf8_lossy(&experiments(&["report", o]).stderr).to_string();
    assert!(!e.contains("in use"), "{e}");
}

#[test]
fn bench_train_breaks_a_step_down() {
    let table = printed(&[
        "bench-train",
        "--norms",
        "gn:groups=8",
        "--batch-sizes",
        "4,2",
        "--min-time",
        "0",
    ]);
    assert!(
        table.contains("| norm | B | step (ms/image) | convolutions | normalizers | rest |"),
        "{table}"
    );
    for b in [4, 2] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| gn:groups=8 | {b} |")))
            .unwrap_or_else(|| panic!("no row for B={b} in\n{table}"));
        assert_eq!(row.matches('%').count(), 3, "{row}");
    }
    let e = fails(&["bench-train", "--batch-sizes", "0", "--min-time", "0"]);
    assert!(e.contains("every batch size must be at least 1"), "{e}");
    let devices = printed(&[
        "bench-train",
        "--norms",
        "bn",
        "--batch-sizes",
        "2",
        "--devices",
        "3",
        "--min-time",
        "0",
    ]);
    assert!(devices.contains("3 device(s)"), "{devices}");
    assert!(devices.contains("| bn | 2 |"), "{devices}");
    let e = fails(&["bench-train", "--devices", "0", "--min-time", "0"]);
    assert!(e.contains("--devices 0 steps over nothing"), "{e}");
    let e = fails(&["bench-train", "--devices", "2", "--pytorch", "python3"]);
    assert!(e.contains("--pytorch times one device only"), "{e}");
}

#[test]
fn benchmark_commands_print_their_tables() {
    let table = printed(&[
        "bench-norms",
        "--shapes",
        "2,32,4,4",
        "--min-time",
        "0",
        "--norms",
        "bn,gn,ln,in",
    ]);
    for row in [
        "| bn | fused |",
        "| gn | reference |",
        "| ln | candle-nn |",
        "| in | fused |",
    ] {
        assert!(table.contains(row), "no {row} in\n{table}");
    }
    // Several thread counts: one process each, then the scaling table from their times.
    let one_and_two_threads = |norm: &str, more: &[&str]| {
        let mut args = vec![
            "bench-norms",
            "--shapes",
            "2,8,4,4",
            "--min-time",
            "0",
            "--norms",
            norm,
            "--no-reference",
            "--threads",
            "1,2",
        ];
        args.extend_from_slice(more);
        printed(&args)
    };
    let table = one_and_two_threads("ln", &[]);
    for line in [
        "training forward and forward+backward, 1 thread(s)",
        "training forward and forward+backward, 2 thread(s)",
        "### Scaling of the fused kernels over 1 thread(s)",
        "| ln | [2, 8, 4, 4] |",
    ] {
        assert!(table.contains(line), "no {line} in\n{table}");
    }
    // Rounds alternate the thread counts' processes; the scaling table gives each ratio's
    // median and range over them.
    let table = one_and_two_threads("in", &["--rounds", "2"]);
    assert!(
        table.contains("over 1 thread(s) (median of 2 rounds' ratios, with their range)"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("| in | [2, 8, 4, 4] |"))
        .unwrap_or_else(|| panic!("no scaling row in\n{table}"));
    assert_eq!(row.matches("× (").count(), 3, "{row}");
    // The later round prints no tables of its own.
    assert_eq!(
        table
            .matches("training forward and forward+backward, 2 thread(s)")
            .count(),
        1
    );
    let e = fails(&[
        "bench-norms",
        "--threads",
        "1",
        "--rounds",
        "2",
        "--min-time",
        "0",
    ]);
    assert!(
        e.contains("--rounds: the rounds alternate thread counts"),
        "{e}"
    );
    let e = fails(&[
        "bench-norms",
        "--threads",
        "1,2",
        "--rounds",
        "0",
        "--min-time",
        "0",
    ]);
    assert!(e.contains("--rounds: give 1 or more"), "{e}");
    let e = fails(&["bench-norms", "--shapes", "2,32,4", "--min-time", "0"]);
    assert!(e.contains("is not N,C,H,W"), "{e}");
    let e = fails(&["bench-norms", "--threads", "0", "--min-time", "0"]);
    assert!(e.contains("--threads: give thread counts above 0"), "{e}");

    let table = printed(&["bench-conv", "--batch-sizes", "2", "--min-time", "0"]);
    assert!(
        table.contains("| stem 3x3 3→16 16×16 | 2 |") && table.contains("| 2 |"),
        "{table}"
    );
}

/// The value of column `key` in each row of runs.csv, keyed by the row's `norm`.
fn by_norm(dir: &Path, key: &str) -> std::collections::BTreeMap<String, String> {
    let text = read(dir, "runs.csv");
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    let header = rows.headers().unwrap().clone();
    let at = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (norm, value) = (at("norm"), at(key));
    rows.records()
        .map(|r| {
            let r = r.unwrap();
            (r[norm].to_string(), r[value].to_string())
        })
        .collect()
}

#[test]
fn the_quick_sweep_takes_every_remedy_and_reports_precise_bn_for_running_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("remedies");
    let o = out.to_str().unwrap();
    let norms = "none,bn,brn,ghostbn:virtual=2,gn+ws,frn,evonorm-s0,evonorm-b0,ln,rms";
    ok(&[
        "sweep",
        "--quick",
        "--norms",
        norms,
        "--batch-sizes",
        "8",
        "--out",
        o,
    ]);
    let precise = by_norm(&out, "test_error_precise");
    let names: Vec<&str> = precise.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "bn",
            "brn",
            "evonorm-b0",
            "evonorm-s0:groups=8",
            "frn",
            "ghostbn:virtual=2",
            "gn:groups=8+ws",
            "ln",
            "none",
            "rms"
        ]
    );
    let diverged = by_norm(&out, "diverged");
    for (norm, value) in &precise {
        let keeps_running_stats =
            ["bn", "brn", "ghostbn:virtual=2", "evonorm-b0"].contains(&norm.as_str());
        if keeps_running_stats && diverged[norm] == "false" {
            let e: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("{norm}: {value:?}"));
            assert!((0.0..=100.0).contains(&e), "{norm}: {e}");
        } else if !keeps_running_stats {
            assert_eq!(value, "", "{norm} has no running statistics");
        }
    }
    let summary = read(&out, "summary.csv");
    assert!(summary
        .lines()
        .next()
        .unwrap()
        .contains("test_error_precise_mean"));
    let manifest = read(&out, "manifest.json");
    assert!(manifest.contains("gn:groups=8+ws"), "{manifest}");
}

#[test]
fn a_sweep_on_devices_trains_d_batches_a_step_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("devices");
    let o = out.to_str().unwrap();
    ok(&[
        "sweep",
        "--quick",
        "--norms",
        "bn",
        "--batch-sizes",
        "2",
        "--devices",
        "4",
        "--out",
        o,
    ]);
    let steps = column(&out, "steps");
    // 512 images, steps of 4 devices × 2 images, one epoch.
    assert_eq!(steps, ["64"]);
    let lr = column(&out, "lr");
    assert_eq!(lr, ["0.025"], "base-lr 0.1 · 8 images / 32");
    let md = read(&out, "summary.md");
    assert!(md.starts_with("On 4 simulated devices"), "{md}");
    let manifest = read(&out, "manifest.json");
    assert!(manifest.contains("\"devices\": 4"), "{manifest}");
}
