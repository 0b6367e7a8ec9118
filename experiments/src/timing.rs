//! Timing for the bench commands: medians over repeated calls, and pairs of calls that
//! alternate so that drift in the machine's speed hits both alike; peak memory from the
//! counting allocator.

use crate::alloc;
use anyhow::Result;
use std::time::Instant;

/// Seconds of one call of `f`.
fn sample(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// The peak bytes one call of `f` allocates above the level before it, from a call of its own
/// (untimed: counting costs time).
fn peak(f: &mut dyn FnMut() -> Result<()>) -> Result<usize> {
    let (out, bytes) = alloc::peak_of(f);
    out.map(|()| bytes)
}

/// Median seconds per call of `f` and peak bytes allocated above the level before a call, over
/// at least 3 calls and `min_time` seconds, after one warm-up call.
pub fn measure(min_time: f64, mut f: impl FnMut() -> Result<()>) -> Result<(f64, usize)> {
    f()?;
    let bytes = peak(&mut f)?;
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || start.elapsed().as_secs_f64() < min_time {
        samples.push(sample(&mut f)?);
    }
    Ok((median(samples), bytes))
}

/// Timed calls of `a` and `b` alternating, so that drift in the machine's speed hits both
/// alike: the seconds of each call, over at least 5 pairs and `min_time` seconds, after one
/// warm-up call of each; and the peak bytes of a call of each.
pub fn alternate(
    min_time: f64,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Vec<[f64; 2]>, [usize; 2])> {
    a()?;
    b()?;
    let peaks = [peak(&mut a)?, peak(&mut b)?];
    let mut pairs = Vec::new();
    let start = Instant::now();
    while pairs.len() < 5 || start.elapsed().as_secs_f64() < min_time {
        pairs.push([sample(&mut a)?, sample(&mut b)?]);
    }
    Ok((pairs, peaks))
}

/// The median: the middle value, or the mean of the middle two.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let h = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[h - 1] + v[h]) / 2.0
    } else {
        v[h]
    }
}

/// Median seconds per call of `a` and of `b`, timed alternating (see [`alternate`]).
pub fn measure_pair(
    min_time: f64,
    a: impl FnMut() -> Result<()>,
    b: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    let (pairs, _) = alternate(min_time, a, b)?;
    Ok((
        median(pairs.iter().map(|p| p[0]).collect()),
        median(pairs.iter().map(|p| p[1]).collect()),
    ))
}

/// Median seconds per call of `f` less a call of `base`, the two alternating (see
/// [`alternate`]); and the peaks of `f` and `base`.
pub fn measure_net(
    min_time: f64,
    base: impl FnMut() -> Result<()>,
    f: impl FnMut() -> Result<()>,
) -> Result<(f64, usize, usize)> {
    let (pairs, [base_peak, f_peak]) = alternate(min_time, base, f)?;
    let net = median(pairs.iter().map(|[b, f]| f - b).collect());
    Ok((net, f_peak, base_peak))
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_takes_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![0.91, 1.05]), 0.98);
    }
}
