//! Leak detection: live and reserved memory across many requests must stay
//! flat once the workload is warm.

/// Samples of memory after each request, and the verdict.
#[derive(Debug, Clone, Default)]
pub struct LeakDetector {
    live: Vec<f64>,
    reserved: Vec<f64>,
}

/// The trend of memory over the second half of the samples (the first half
/// is warm-up: caches fill, sizes are first seen).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeakReport {
    /// Samples taken.
    pub samples: usize,
    /// Least-squares slope of live bytes per request.
    pub live_slope: f64,
    /// Least-squares slope of reserved bytes per request.
    pub reserved_slope: f64,
    /// Growth the live slope predicts over the measured half, as a share of
    /// the highest live value (0.01 = 1%).
    pub live_growth: f64,
    /// The same for reserved memory.
    pub reserved_growth: f64,
    /// Both growths within the tolerance.
    pub flat: bool,
}

fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        sxy += dx * (y - my);
        sxx += dx * dx;
    }
    sxy / sxx
}

impl LeakDetector {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records memory after one request (or any unit of work).
    pub fn record(&mut self, live: u64, reserved: u64) {
        self.live.push(live as f64);
        self.reserved.push(reserved as f64);
    }

    /// The trend; flat when neither live nor reserved memory would grow by
    /// more than `tolerance` (a share of its peak) over the measured half.
    pub fn report(&self, tolerance: f64) -> LeakReport {
        let half = self.live.len() / 2;
        let (live, reserved) = (&self.live[half..], &self.reserved[half..]);
        let (ls, rs) = (slope(live), slope(reserved));
        let growth = |s: f64, ys: &[f64]| {
            let peak = ys.iter().copied().fold(1.0f64, f64::max);
            s * ys.len() as f64 / peak
        };
        let (lg, rg) = (growth(ls, live), growth(rs, reserved));
        LeakReport {
            samples: self.live.len(),
            live_slope: ls,
            reserved_slope: rs,
            live_growth: lg,
            reserved_growth: rg,
            flat: lg <= tolerance && rg <= tolerance,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_separates_flat_from_growing() {
        let mut flat = LeakDetector::new();
        let mut leak = LeakDetector::new();
        for i in 0..100u64 {
            flat.record(1000 + (i % 7) * 3, 1100 + (i % 5) * 2);
            leak.record(1000 + i * 10, 1100 + i * 10);
        }
        let f = flat.report(0.01);
        assert!(f.flat, "{f:?}");
        let l = leak.report(0.01);
        assert!(!l.flat, "{l:?}");
        assert!((l.live_slope - 10.0).abs() < 1e-9, "{l:?}");
    }
}
