//! Log2-bucketed histograms of durations, lock-free to record into.

use crate::collector::Update;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Number of buckets: bucket `i` holds values in `(2^(i-1), 2^i]` nanoseconds
/// (bucket 0 holds 0 and 1 ns); the last bucket also takes everything above
/// its bound (2^47 ns is about 39 hours).
pub const BUCKETS: usize = 48;

/// The bucket of a value in nanoseconds: the ceiling of its log2, so that the
/// bucket's upper bound is inclusive (Prometheus `le` semantics).
#[inline]
pub(crate) fn bucket_of(nanos: u64) -> usize {
    if nanos <= 1 {
        0
    } else {
        let ceil_log2 = (64 - (nanos - 1).leading_zeros()) as usize;
        ceil_log2.min(BUCKETS - 1)
    }
}

/// Inclusive upper bound of bucket `i`, in nanoseconds.
pub fn bucket_upper_nanos(i: usize) -> u64 {
    1u64 << i.min(63)
}

/// Durations as nanoseconds, saturating (a u64 of nanoseconds is 584 years).
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A histogram that many threads add to with relaxed atomics.
#[derive(Debug)]
pub(crate) struct AtomicHistogram {
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    #[inline(always)]
    pub(crate) fn record<U: Update>(&self, nanos: u64) {
        U::add(&self.buckets[bucket_of(nanos)], 1);
        U::add(&self.sum_nanos, nanos);
    }

    /// Adds this histogram's counts into `into`.
    pub(crate) fn add_into(&self, into: &mut HistogramSnapshot) {
        for (dst, src) in into.buckets.iter_mut().zip(&self.buckets) {
            *dst += src.load(Relaxed);
        }
        into.sum_nanos = into.sum_nanos.saturating_add(self.sum_nanos.load(Relaxed));
    }
}

/// A histogram read out of the collector: per-bucket (not cumulative) counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// Count per bucket; bucket `i` holds values in `(2^(i-1), 2^i]` ns.
    pub buckets: Vec<u64>,
    /// Sum of all recorded values, in nanoseconds.
    pub sum_nanos: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: vec![0; BUCKETS],
            sum_nanos: 0,
        }
    }
}

impl HistogramSnapshot {
    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Mean in seconds (0 when empty).
    pub fn mean_seconds(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            0.0
        } else {
            self.sum_nanos as f64 / n as f64 / 1e9
        }
    }

    /// Upper bound, in seconds, of the bucket holding quantile `q` (0..=1):
    /// an estimate that is never below the true quantile and at most 2x above
    /// it. 0 when empty.
    pub fn quantile_upper_seconds(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper_nanos(i) as f64 / 1e9;
            }
        }
        bucket_upper_nanos(BUCKETS - 1) as f64 / 1e9
    }

    /// The counts recorded since `earlier` (saturating, for counters read
    /// while being written).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
                .map(|(now, before)| now.saturating_sub(*before))
                .collect(),
            sum_nanos: self.sum_nanos.saturating_sub(earlier.sum_nanos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_have_inclusive_power_of_two_bounds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(4), 2);
        assert_eq!(bucket_of(5), 3);
        assert_eq!(bucket_of(1024), 10);
        assert_eq!(bucket_of(1025), 11);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for v in [1u64, 7, 1000, 123_456_789] {
            assert!(v <= bucket_upper_nanos(bucket_of(v)));
        }
    }

    #[test]
    fn quantiles_and_means() {
        let h = AtomicHistogram::default();
        for v in [100u64, 200, 300, 4000] {
            h.record::<crate::collector::SharedUpdate>(v);
        }
        let mut s = HistogramSnapshot::default();
        h.add_into(&mut s);
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_nanos, 4600);
        assert!((s.mean_seconds() - 1150e-9).abs() < 1e-15);
        // Median: the 2nd value (200 ns) lies in (128, 256].
        assert_eq!(s.quantile_upper_seconds(0.5), 256e-9);
        assert_eq!(s.quantile_upper_seconds(1.0), 4096e-9);
        let empty = HistogramSnapshot::default();
        assert_eq!(empty.quantile_upper_seconds(0.99), 0.0);
        assert_eq!(s.since(&s).count(), 0);
    }
}
