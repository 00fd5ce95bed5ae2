//! Per-site lifetime model: what the registry learns from each site.
//!
//! Lifetimes follow the estimator TCP uses for round-trip times: an
//! exponentially weighted mean and mean deviation, whose `mean + 4 dev` is a
//! safe upper bound; a ring of recent samples gives quantiles. The time
//! between creations at a site tells whether the site will allocate again
//! soon, so its size is worth keeping in a cache.

/// Recent lifetimes kept per site for quantiles.
const RING: usize = 32;

/// What is known about tensor lifetimes at one site.
#[derive(Debug, Clone)]
pub struct SiteModel {
    alpha: f64,
    /// Tensors created here.
    pub created: u64,
    /// Tensors created here and freed.
    pub freed: u64,
    /// Bytes of tensors from here that are live now.
    pub live_bytes: u64,
    /// Size of the latest tensor.
    pub last_size: usize,
    /// When the latest tensor was created (ns since the registry started).
    pub last_create_ns: u64,
    interarrival_ns: Option<f64>,
    lifetime_ns: Option<f64>,
    lifetime_dev_ns: f64,
    ring: [u64; RING],
    ring_len: usize,
    ring_next: usize,
}

/// The predicted lifetime of the next tensor of a site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LifetimePrediction {
    /// Expected lifetime (moving average), ns.
    pub expected_ns: f64,
    /// A bound rarely exceeded: mean plus four mean deviations, ns.
    pub upper_ns: f64,
}

impl SiteModel {
    /// An empty model whose averages weigh each new sample by `alpha`.
    pub fn new(alpha: f64) -> SiteModel {
        SiteModel {
            alpha,
            created: 0,
            freed: 0,
            live_bytes: 0,
            last_size: 0,
            last_create_ns: 0,
            interarrival_ns: None,
            lifetime_ns: None,
            lifetime_dev_ns: 0.0,
            ring: [0; RING],
            ring_len: 0,
            ring_next: 0,
        }
    }

    /// A tensor of `bytes` was created at `now_ns`.
    pub fn observe_create(&mut self, now_ns: u64, bytes: usize) {
        if self.created > 0 {
            let gap = now_ns.saturating_sub(self.last_create_ns) as f64;
            self.interarrival_ns = Some(match self.interarrival_ns {
                None => gap,
                Some(m) => m + self.alpha * (gap - m),
            });
        }
        self.created += 1;
        self.live_bytes += bytes as u64;
        self.last_size = bytes;
        self.last_create_ns = now_ns;
    }

    /// A tensor of `bytes` from here was freed after `lifetime_ns`.
    pub fn observe_free(&mut self, lifetime_ns: u64, bytes: usize) {
        self.freed += 1;
        self.live_bytes = self.live_bytes.saturating_sub(bytes as u64);
        let x = lifetime_ns as f64;
        match self.lifetime_ns {
            None => {
                self.lifetime_ns = Some(x);
                self.lifetime_dev_ns = x / 2.0;
            }
            Some(m) => {
                self.lifetime_dev_ns += self.alpha * ((x - m).abs() - self.lifetime_dev_ns);
                self.lifetime_ns = Some(m + self.alpha * (x - m));
            }
        }
        self.ring[self.ring_next] = lifetime_ns;
        self.ring_next = (self.ring_next + 1) % RING;
        self.ring_len = (self.ring_len + 1).min(RING);
    }

    /// The lifetime the next tensor of this site will likely have; None
    /// before the first free.
    pub fn predicted_lifetime(&self) -> Option<LifetimePrediction> {
        self.lifetime_ns.map(|m| LifetimePrediction {
            expected_ns: m,
            upper_ns: m + 4.0 * self.lifetime_dev_ns,
        })
    }

    /// The `q` quantile (0..=1) of the recent lifetimes, ns.
    pub fn lifetime_quantile(&self, q: f64) -> Option<u64> {
        if self.ring_len == 0 {
            return None;
        }
        let mut v: Vec<u64> = self.ring[..self.ring_len].to_vec();
        v.sort_unstable();
        let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        v.get(idx).copied()
    }

    /// Mean time between creations here, ns; None before the second one.
    pub fn interarrival_ns(&self) -> Option<f64> {
        self.interarrival_ns
    }

    /// Whether this site is expected to create another tensor between now
    /// and `now_ns + horizon_ns`: it has a rhythm, and the next beat (or a
    /// late one, up to three beats overdue) falls inside the window.
    pub fn creates_within(&self, now_ns: u64, horizon_ns: u64) -> bool {
        let Some(gap) = self.interarrival_ns else {
            return false;
        };
        let next = self.last_create_ns as f64 + gap;
        let end = (now_ns + horizon_ns) as f64;
        next <= end && now_ns as f64 <= self.last_create_ns as f64 + 4.0 * gap.max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_follows_lifetimes_and_bounds_them() {
        let mut m = SiteModel::new(0.2);
        assert!(m.predicted_lifetime().is_none());
        for i in 0..50 {
            m.observe_create(i * 1000, 64);
            m.observe_free(100 + (i % 3) * 10, 64);
        }
        let p = m.predicted_lifetime().unwrap();
        assert!((95.0..=125.0).contains(&p.expected_ns), "{p:?}");
        assert!(p.upper_ns >= 120.0, "{p:?}");
        assert_eq!(m.lifetime_quantile(1.0), Some(120));
        assert_eq!(m.lifetime_quantile(0.0), Some(100));
        assert_eq!(m.live_bytes, 0);
        assert_eq!((m.created, m.freed), (50, 50));
    }

    #[test]
    fn rhythm_predicts_the_next_creation() {
        let mut m = SiteModel::new(0.5);
        assert!(!m.creates_within(0, 1_000_000));
        for i in 0..10 {
            m.observe_create(i * 1_000, 8);
        }
        assert!((m.interarrival_ns().unwrap() - 1000.0).abs() < 1.0);
        // last at 9000, next due at 10000.
        assert!(m.creates_within(9_500, 600));
        assert!(!m.creates_within(9_100, 500));
        // Long silent: the rhythm is over.
        assert!(!m.creates_within(1_000_000, 1_000));
    }
}
