//! A sweep folder's `manifest.json`: the plan, versions, machine, source tree and times, and the
//! check that refuses to resume a folder under other settings.

use crate::results::MANIFEST_JSON;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use std::time::SystemTime;

/// Now, as RFC 3339 to the second.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// What a sweep's manifest says that does not change while it runs, read once when the sweep
/// starts: the source tree (commit, and whether tracked files differed from it) so that the
/// final manifest does not name a commit made while it ran, and the machine's CPU.
pub struct Manifest {
    /// The plan's own description: settings, grid, shard.
    plan: serde_json::Value,
    jobs: usize,
    threads_per_job: usize,
    runs_in_plan: usize,
    start: String,
    cpu: String,
    commit: String,
    dirty: Option<bool>,
}

impl Manifest {
    pub fn start(
        plan: serde_json::Value,
        jobs: usize,
        threads_per_job: usize,
        runs: usize,
    ) -> Self {
        Self {
            plan,
            jobs,
            threads_per_job,
            runs_in_plan: runs,
            start: now(),
            cpu: cpu_model(),
            commit: command_output("git", &["rev-parse", "HEAD"])
                .unwrap_or_else(|| "unknown".into()),
            dirty: command_output("git", &["status", "--porcelain", "--untracked-files=no"])
                .map(|s| !s.is_empty()),
        }
    }

    /// The manifest with `done` runs finished, ended at `end` (none while running), and the
    /// failure that stopped the sweep, if any.
    pub fn json(&self, end: Option<&str>, done: usize, failure: Option<&str>) -> serde_json::Value {
        let mut m = json!({
            "failure": failure,
            "tool": "normbench experiments sweep",
            "command": std::env::args().collect::<Vec<_>>(),
            "runs_in_plan": self.runs_in_plan,
            "runs_finished": done,
            "versions": {
                "experiments": env!("CARGO_PKG_VERSION"),
                "candle-core": env!("NORMBENCH_CANDLE_CORE_VERSION"),
                "candle-nn": env!("NORMBENCH_CANDLE_NN_VERSION"),
                "rustc": env!("NORMBENCH_RUSTC_VERSION"),
            },
            "git_commit": self.commit,
            "git_dirty": self.dirty,
            "jobs": self.jobs,
            "threads_per_job": self.threads_per_job,
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "cpu": self.cpu,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "start_time": self.start,
            "end_time": end,
        });
        if let (Some(m), Some(plan)) = (m.as_object_mut(), self.plan.as_object()) {
            m.extend(plan.clone());
        }
        m
    }
}

/// Refuses to mix runs of different settings in one folder.
pub fn check_settings(out: &Path, settings: &serde_json::Value) -> Result<()> {
    let path = out.join(MANIFEST_JSON);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let old: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not valid JSON; move it away to start afresh",
            path.display()
        )
    })?;
    if &old["settings"] != settings {
        bail!(
            "{} holds a sweep with other settings ({}), not ({}); use another --out, or the same \
             settings to resume it",
            out.display(),
            old["settings"],
            settings
        );
    }
    Ok(())
}
