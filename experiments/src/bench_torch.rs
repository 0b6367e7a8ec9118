//! `bench-train --pytorch PYTHON`: the same model's training step timed by PyTorch on CPU, by
//! `scripts/bench_train_torch.py` run in the same process tree, so that both columns of the
//! table come from one run on one machine.

use crate::model::ModelConfig;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The script, found from this crate's source folder.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_train_torch.py")
}

/// Refuses the models and `--norms` entries the script has no twin for, before anything is
/// timed (the script itself names a normalizer it cannot build).
pub fn check(model: &ModelConfig, norms: &[String]) -> Result<()> {
    ensure!(
        model.stem == 1 && !model.ws && model.dropout == 0.0,
        "--pytorch: the PyTorch twin builds resnet:width=W,blocks=K,stages=N,groups=G only \
         (no stem, ws or dropout key); got {model}"
    );
    if let Some(norm) = norms.iter().find(|n| crate::model::split_ws(n).1) {
        bail!("--pytorch: the PyTorch twin has no Weight Standardization; drop {norm:?}'s +ws");
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Reply {
    torch: String,
    rows: Vec<ReplyRow>,
}

#[derive(serde::Deserialize)]
struct ReplyRow {
    batch: usize,
    ms_per_image: f64,
}

/// PyTorch's version and its step per image (ms) for `norm` at each of `batch_sizes`.
pub fn step_times(
    python: &Path,
    model: &ModelConfig,
    norm: &str,
    batch_sizes: &[usize],
    size: usize,
    threads: usize,
    min_time: f64,
) -> Result<(String, Vec<f64>)> {
    let list = |v: &[usize]| {
        v.iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let out = Command::new(python)
        .arg(script())
        .args(["--norms", norm, "--batch-sizes", &list(batch_sizes)])
        .args(["--width", &model.width.to_string()])
        .args(["--blocks", &model.blocks.to_string()])
        .args(["--stages", &model.stages.to_string()])
        .args(["--size", &size.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--min-time", &min_time.to_string()])
        .output()
        .with_context(|| {
            format!(
                "--pytorch {}: cannot start it; give a Python that has torch \
                 (e.g. python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch)",
                python.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "--pytorch: {} {} failed ({}): {}",
            python.display(),
            script().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let reply: Reply = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "--pytorch: the script's output is not the JSON it should print: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let times: Vec<f64> = batch_sizes
        .iter()
        .map(|&b| {
            reply
                .rows
                .iter()
                .find(|r| r.batch == b)
                .map(|r| r.ms_per_image)
                .with_context(|| format!("--pytorch: the script gave no time for B={b}"))
        })
        .collect::<Result<_>>()?;
    Ok((reply.torch, times))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for Python that prints `reply` whatever it is asked.
    fn fake_python(dir: &Path, reply: &str) -> PathBuf {
        let path = dir.join("python");
        std::fs::write(&path, format!("#!/bin/sh\necho '{reply}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_scripts_times_come_back_in_batch_order_and_bad_replies_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelConfig::default();
        let reply = r#"{"torch": "9.9", "threads": 1, "rows": [{"norm": "bn", "batch": 2, "ms_per_image": 1.5}, {"norm": "bn", "batch": 32, "ms_per_image": 0.25}]}"#;
        let python = fake_python(dir.path(), reply);
        let (version, times) = step_times(&python, &model, "bn", &[32, 2], 16, 1, 0.0).unwrap();
        assert_eq!((version.as_str(), times), ("9.9", vec![0.25, 1.5]));
        let e = step_times(&python, &model, "bn", &[8], 16, 1, 0.0).unwrap_err();
        assert!(e.to_string().contains("no time for B=8"), "{e}");
        let garbled = fake_python(dir.path(), "not json");
        let e = step_times(&garbled, &model, "bn", &[2], 16, 1, 0.0).unwrap_err();
        assert!(e.to_string().contains("not the JSON"), "{e}");
        let e = step_times(&dir.path().join("none"), &model, "bn", &[2], 16, 1, 0.0).unwrap_err();
        assert!(e.to_string().contains("cannot start it"), "{e}");
        let norms = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let strided: ModelConfig = "resnet:stem=2".parse().unwrap();
        assert!(check(&strided, &norms(&["bn"])).is_err());
        let e = check(&model, &norms(&["bn", "gn:groups=8+ws"])).unwrap_err();
        assert!(e.to_string().contains("Weight Standardization"), "{e}");
        assert!(check(&model, &norms(&["bn", "gn:groups=8", "ln", "in"])).is_ok());
    }
}
