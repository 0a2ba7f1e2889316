//! Latency percentiles computed from every sample (nearest rank): runs are small enough to
//! keep them all, so no histogram and no approximation.

use std::time::Duration;

use serde::Serialize;

/// Count, mean and percentiles of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// `None` without samples.
    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let total: Duration = samples.iter().sum();
        Some(Self {
            count: samples.len(),
            mean_ms: ms(total) / samples.len() as f64,
            p50_ms: ms(percentile(&samples, 50.0)?),
            p99_ms: ms(percentile(&samples, 99.0)?),
            max_ms: ms(*samples.last()?),
        })
    }
}

/// The nearest-rank percentile of sorted samples: the smallest sample with at least `p`
/// percent of all samples at or below it. `None` without samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&sorted, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&sorted, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&sorted, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&sorted, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&ms(&[7]), 99.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn a_summary_sorts_its_samples() {
        let summary = LatencySummary::of(ms(&[30, 10, 20, 40])).unwrap();
        assert_eq!(summary.count, 4);
        assert_eq!(summary.mean_ms, 25.0);
        assert_eq!(summary.p50_ms, 20.0);
        assert_eq!(summary.p99_ms, 40.0);
        assert_eq!(summary.max_ms, 40.0);
        assert_eq!(LatencySummary::of(Vec::new()), None);
    }
}
