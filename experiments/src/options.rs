//! The `NAME:key=value,...` options of `--dataset` and `--model`.

use anyhow::{Context, Result};

/// The `key=value` pairs of the options `opts` of a `flag NAME:opts` argument `whole`.
pub fn key_values<'a>(opts: &'a str, flag: &str, whole: &str) -> Result<Vec<(&'a str, &'a str)>> {
    opts.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=').with_context(|| {
                format!("malformed option {kv:?} in {flag} {whole:?}; write key=value")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_keys_and_values_and_name_bad_ones() {
        assert_eq!(
            key_values("a=1,,b=x", "--model", "m:a=1,,b=x").unwrap(),
            [("a", "1"), ("b", "x")]
        );
        let e = key_values("a", "--model", "m:a").unwrap_err().to_string();
        assert!(
            e.contains("malformed option \"a\"") && e.contains("key=value"),
            "{e}"
        );
    }
}
