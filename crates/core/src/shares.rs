//! Jobset scheduling shares: which jobset has used the least of its share
//! of the farm lately.
//!
//! Each jobset has a number of shares (`Jobsets.schedulingShares`, 100 by
//! default). The build time of every finished attempt is charged to the
//! jobset of the build it ran for, and forgotten once it is older than the
//! window ([`crate::Config::share_window`]). A jobset's rank is the time it
//! used in the window over its shares: at dispatch, among steps of equal
//! global priority, the jobset with the lowest rank goes first. Over time
//! each busy jobset so gets build time in proportion to its shares.
//!
//! Invariant: `used` is exactly the sum of the charges in `charges`, which
//! are in order of time.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::types::{JobsetId, Millis};

/// A jobset's shares until told otherwise (Hydra's default).
pub const DEFAULT_SHARES: u32 = 100;

#[derive(Debug, Default)]
pub struct Shares {
    shares: HashMap<JobsetId, u32>,
    used: HashMap<JobsetId, u64>,
    /// (when charged, jobset, milliseconds), oldest first.
    charges: VecDeque<(Millis, JobsetId, u64)>,
}

impl Shares {
    /// Sets `jobset`'s shares; 0 counts as 1.
    pub fn set(&mut self, jobset: JobsetId, shares: u32) {
        self.shares.insert(jobset, shares.max(1));
    }

    /// Charges `jobset` for an attempt that ran from `since` to `now`.
    pub fn charge(&mut self, jobset: JobsetId, since: Millis, now: Millis) {
        let ms = now.0.saturating_sub(since.0);
        if ms == 0 {
            return;
        }
        self.charges.push_back((now, jobset, ms));
        *self.used.entry(jobset).or_default() += ms;
    }

    /// Forgets the charges older than `window` at `now`.
    pub fn expire(&mut self, now: Millis, window: Duration) {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let horizon = now.0.saturating_sub(window_ms);
        while let Some(&(at, jobset, ms)) = self.charges.front() {
            if at.0 >= horizon {
                break;
            }
            self.charges.pop_front();
            if let Some(used) = self.used.get_mut(&jobset) {
                *used = used.saturating_sub(ms);
                if *used == 0 {
                    self.used.remove(&jobset);
                }
            }
        }
    }

    /// Build time used in the window per share: lower goes first.
    pub fn rank(&self, jobset: JobsetId) -> f64 {
        let used = self.used.get(&jobset).copied().unwrap_or(0) as f64;
        let shares = self.shares.get(&jobset).copied().unwrap_or(DEFAULT_SHARES);
        used / f64::from(shares)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_is_recent_use_per_share() {
        let (a, b) = (JobsetId(1), JobsetId(2));
        let mut s = Shares::default();
        s.set(a, 300);
        s.set(b, 100);
        s.charge(a, Millis(0), Millis(3_000));
        s.charge(b, Millis(0), Millis(1_000));
        assert_eq!(s.rank(a), s.rank(b), "3 s on 300 shares = 1 s on 100");
        assert_eq!(s.rank(JobsetId(3)), 0.0, "an idle jobset goes first");
        // Charges older than the window are forgotten.
        s.charge(b, Millis(5_000), Millis(6_000));
        s.expire(Millis(13_500), Duration::from_secs(10));
        assert_eq!(s.rank(a), 0.0, "charged at 3 s, before the window");
        assert_eq!(s.rank(b), 10.0, "1 s left, charged at 6 s");
    }
}
