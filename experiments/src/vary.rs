//! `sweep --vary KEY=V1,V2,...`: any run setting as an axis of the grid, beside the built-in
//! normalizer, batch size and seed. Each varied key becomes a column of the CSVs and part of each
//! run's identity (resume, `--shard`, `merge`); the set of varied keys is part of the sweep's
//! settings, and so of its id.

use anyhow::{bail, ensure, Context, Result};

/// The keys `--vary` takes, each with what its values must be.
pub const KEYS: [(&str, &str); 8] = [
    ("base-lr", "a number > 0"),
    ("weight-decay", "a number >= 0"),
    ("epochs", "a whole number >= 1"),
    ("warmup-epochs", "a number >= 0"),
    ("dropout", "a number in [0, 1)"),
    ("init-gain", "a number > 0"),
    ("momentum", "a number in [0, 1)"),
    ("devices", "a whole number >= 1"),
];

/// One varied key and its values, each in canonical text (how it prints in CSVs and tables).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

/// A run's value of each varied key, in the order the keys were given.
pub type Setting = Vec<(String, String)>;

pub fn known_keys() -> String {
    KEYS.map(|(k, _)| k).join(", ")
}

/// The canonical text of `text` as a value of `key`, or an error naming the range.
fn canonical(key: &str, text: &str) -> Result<String> {
    let says = KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, says)| *says)
        .unwrap_or("a number");
    if key == "epochs" || key == "devices" {
        return match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n.to_string()),
            _ => bail!("--vary {key}={text:?}: each value must be {says}"),
        };
    }
    let v: f64 = text.parse().with_context(|| {
        format!("--vary {key}: {text:?} is not a number; each value must be {says}")
    })?;
    let ok = v.is_finite()
        && match key {
            "base-lr" | "init-gain" => v > 0.0,
            "weight-decay" | "warmup-epochs" => v >= 0.0,
            _ => (0.0..1.0).contains(&v),
        };
    ensure!(
        ok,
        "--vary {key}={text} is out of range; each value must be {says}"
    );
    Ok(v.to_string())
}

/// Parses the `--vary` arguments: known keys, each once, each with a non-empty list of distinct
/// values in range.
pub fn parse(args: &[String]) -> Result<Vec<Axis>> {
    let mut axes: Vec<Axis> = Vec::new();
    for arg in args {
        let Some((key, list)) = arg.split_once('=') else {
            bail!("--vary {arg:?} is not KEY=V1,V2,...; e.g. --vary base-lr=0.05,0.1,0.2");
        };
        let key = key.trim();
        ensure!(
            KEYS.iter().any(|(k, _)| *k == key),
            "--vary: unknown key {key:?}; the keys are {}",
            known_keys()
        );
        ensure!(
            !axes.iter().any(|a| a.key == key),
            "--vary {key} is given twice; give all its values in one list: --vary {key}=V1,V2"
        );
        let mut values = Vec::new();
        for text in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let v = canonical(key, text)?;
            ensure!(
                !values.contains(&v),
                "--vary {key} names the value {v} twice"
            );
            values.push(v);
        }
        ensure!(
            !values.is_empty(),
            "--vary {key}= has no values; give a list: --vary {key}=V1,V2"
        );
        axes.push(Axis {
            key: key.to_string(),
            values,
        });
    }
    Ok(axes)
}

/// Every combination of the axes' values (the first axis outermost); one empty setting when
/// nothing is varied.
pub fn settings(axes: &[Axis]) -> Vec<Setting> {
    let mut all: Vec<Setting> = vec![Vec::new()];
    for axis in axes {
        all = all
            .into_iter()
            .flat_map(|s| {
                axis.values.iter().map(move |v| {
                    let mut s = s.clone();
                    s.push((axis.key.clone(), v.clone()));
                    s
                })
            })
            .collect();
    }
    all
}

/// `key=value, key=value` (empty for no setting).
pub fn label(setting: &Setting) -> String {
    setting
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `values` (at least three, all positive) grow by a constant factor, within 10%: such
/// an axis is drawn on a log scale.
pub fn is_geometric(values: &[f64]) -> bool {
    if values.len() < 3 || values.iter().any(|&v| v <= 0.0) {
        return false;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let ratios: Vec<f64> = sorted.windows(2).map(|w| w[1] / w[0]).collect();
    let first = ratios[0];
    first > 1.0 && ratios.iter().all(|r| (r / first - 1.0).abs() < 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn axes_parse_to_canonical_values_and_combine() {
        let axes = parse(&args(&["base-lr=0.10,5e-2", "dropout=0,0.3", "epochs=4"])).unwrap();
        assert_eq!(axes[0].values, ["0.1", "0.05"]);
        assert_eq!(axes[1].values, ["0", "0.3"]);
        let all = settings(&axes);
        assert_eq!(all.len(), 4);
        assert_eq!(label(&all[1]), "base-lr=0.1, dropout=0.3, epochs=4");
        assert_eq!(settings(&[]), vec![Vec::new()]);
    }

    #[test]
    fn bad_axes_are_named() {
        for (bad, msg) in [
            (vec!["lr=0.1"], "unknown key \"lr\""),
            (vec!["base-lr="], "has no values"),
            (vec!["base-lr=0.1", "base-lr=0.2"], "given twice"),
            (vec!["base-lr=0.1,0.1"], "names the value 0.1 twice"),
            (vec!["base-lr=-0.1"], "out of range"),
            (vec!["base-lr=x"], "not a number"),
            (vec!["dropout=1"], "in [0, 1)"),
            (vec!["momentum=1.5"], "in [0, 1)"),
            (vec!["epochs=0"], "whole number >= 1"),
            (vec!["epochs=2.5"], "whole number >= 1"),
            (vec!["devices=0"], "whole number >= 1"),
            (vec!["init-gain=0"], "> 0"),
            (vec!["weight-decay=NaN"], ">= 0"),
            (vec!["base-lr"], "not KEY=V1,V2"),
        ] {
            let e = format!("{:#}", parse(&args(&bad)).unwrap_err());
            assert!(e.contains(msg), "{bad:?}: {e}");
        }
    }

    #[test]
    fn geometric_axes_are_recognized() {
        assert!(is_geometric(&[0.025, 0.05, 0.1, 0.2, 0.4, 0.8]));
        assert!(is_geometric(&[0.25, 1.0, 4.0]));
        assert!(!is_geometric(&[0.0, 5e-5, 5e-4]));
        assert!(!is_geometric(&[1.0, 2.0, 3.0]));
        assert!(!is_geometric(&[0.0, 0.3]));
    }
}
