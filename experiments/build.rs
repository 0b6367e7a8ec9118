//! Records the versions of candle and rustc this binary was built with, for the sweep manifest.

fn lock_version(lock: &str, name: &str) -> String {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == format!("name = \"{name}\"") {
            if let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
            {
                return v.trim_matches('"').to_string();
            }
        }
    }
    "unknown".to_string()
}

fn main() {
    let lock = std::fs::read_to_string("../Cargo.lock").unwrap_or_default();
    println!(
        "cargo:rustc-env=NORMBENCH_CANDLE_CORE_VERSION={}",
        lock_version(&lock, "candle-core")
    );
    println!(
        "cargo:rustc-env=NORMBENCH_CANDLE_NN_VERSION={}",
        lock_version(&lock, "candle-nn")
    );
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NORMBENCH_RUSTC_VERSION={version}");
    println!("cargo:rerun-if-changed=../Cargo.lock");
}
