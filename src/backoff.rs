//! Retry delays shared by every loop that waits for something outside (the Kubernetes API, the
//! kernel): exponential from a minimum to a maximum, each delay with up to 50 % random jitter so
//! that many agents retrying against one restarted API server do not return in step.
//!
//! Depends only on std.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff with jitter; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays starting at `min`, doubling up to `max` (before jitter).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The next delay: the current base plus up to half of it at random; doubles the base.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        base + base.mul_f64((r % 1000) as f64 / 2000.0)
    }

    /// The longest delay this backoff can return (its maximum plus the full jitter).
    pub fn longest(&self) -> Duration {
        self.max + self.max / 2
    }

    /// Start again from the minimum.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_maximum_with_at_most_half_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let bases = [100, 200, 400, 400, 400];
        for base in bases {
            let d = b.next_delay().as_millis();
            assert!(
                d >= base && d <= base + base / 2,
                "{d} not in [{base}, {}]",
                base * 3 / 2
            );
        }
        assert_eq!(b.longest(), Duration::from_millis(600));
    }

    #[test]
    fn reset_starts_again_from_the_minimum() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay());
        }
        assert!(seen.len() > 10, "only {} distinct delays", seen.len());
    }
}
