//! Retry policy: how many attempts, and how long to wait between them.
//!
//! Exponential back-off from `retryseconds`, doubled per failed attempt, capped, with jitter so
//! that many files failing together do not retry in lock-step against the same door.

use std::num::NonZeroU32;
use std::time::Duration;

use rand::Rng;

/// Longest single wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    first: Duration,
    attempts: NonZeroU32,
}

impl RetryPolicy {
    pub fn new(first: Duration, attempts: NonZeroU32) -> Self {
        Self { first, attempts }
    }

    /// The first back-off (`retryseconds`).
    pub fn first(&self) -> Duration {
        self.first
    }

    /// Attempts per file before it is a failure (`retrytimes`).
    pub fn attempts(&self) -> NonZeroU32 {
        self.attempts
    }

    /// The wait before the attempt that follows `failed` failed attempts (1-based): nominally
    /// `first * 2^(failed-1)`, capped at [`MAX_BACKOFF`], drawn uniformly from its upper half.
    pub fn backoff(&self, failed: u32, rng: &mut impl Rng) -> Duration {
        let nominal = self.nominal(failed);
        if nominal.is_zero() {
            return nominal;
        }
        let half = nominal / 2;
        half + rng.gen_range(Duration::ZERO..=half)
    }

    fn nominal(&self, failed: u32) -> Duration {
        let shift = failed.saturating_sub(1).min(30);
        self.first
            .saturating_mul(1u32 << shift)
            .min(MAX_BACKOFF.max(self.first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_with_jitter_and_a_cap() {
        let p = RetryPolicy::new(Duration::from_secs(1), NonZeroU32::new(10).unwrap());
        let mut rng = rand::thread_rng();
        for failed in 1..=5u32 {
            let nominal = Duration::from_secs(1 << (failed - 1));
            for _ in 0..50 {
                let d = p.backoff(failed, &mut rng);
                assert!(d >= nominal / 2 && d <= nominal, "{failed}: {d:?}");
            }
        }
        assert!(p.backoff(40, &mut rng) <= MAX_BACKOFF);
        let zero = RetryPolicy::new(Duration::ZERO, NonZeroU32::new(3).unwrap());
        assert_eq!(zero.backoff(3, &mut rng), Duration::ZERO);
    }
}
