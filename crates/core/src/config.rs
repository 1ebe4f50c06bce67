//! Tunables of the scheduling core, with Hydra's defaults.
//!
//! Invariant: a `Config` is fixed for the life of a [`crate::Core`].

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Config {
    /// How long a runnable step may wait for a machine that can build it
    /// before it fails as unsupported (status 9). Hydra:
    /// `max_unsupported_time`, 120 s.
    pub max_unsupported_time: Duration,
    /// Attempts of a step before a retryable failure becomes final. Hydra:
    /// `max_tries`, 5.
    pub max_tries: u32,
    /// Delay before the first retry. Hydra: `retry_interval`, 60 s.
    pub retry_interval: Duration,
    /// Each further retry waits this many times longer. Hydra:
    /// `retry_backoff`, 3.
    pub retry_backoff: f64,
    /// How far back a jobset's build time counts against its scheduling
    /// shares ([`crate::shares`]). One hour.
    pub share_window: Duration,
    /// The expected build time of a step whose [`crate::StepSpec`] says
    /// none (`expected_ms: None`), for its critical path. One minute.
    pub expected_build_time: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_unsupported_time: Duration::from_secs(120),
            max_tries: 5,
            retry_interval: Duration::from_secs(60),
            retry_backoff: 3.0,
            share_window: Duration::from_secs(3600),
            expected_build_time: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// A step's expected build time in milliseconds: its own estimate, or
    /// the default (saturating at `u32::MAX`, 49 days).
    pub fn expected_ms(&self, estimate: Option<u32>) -> u32 {
        estimate.unwrap_or_else(|| {
            u32::try_from(self.expected_build_time.as_millis()).unwrap_or(u32::MAX)
        })
    }

    /// The wait before the retry that follows failed attempt number `tries`
    /// (1-based).
    pub fn retry_delay(&self, tries: u32) -> Duration {
        let exponent = i32::try_from(tries.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.retry_backoff.max(0.0).powi(exponent);
        // `as` saturates on overflow and maps NaN to 0.
        let ms = (self.retry_interval.as_millis() as f64 * factor) as u64;
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_geometrically_and_saturates() {
        let config = Config::default();
        assert_eq!(config.retry_delay(1), Duration::from_secs(60));
        assert_eq!(config.retry_delay(2), Duration::from_secs(180));
        assert_eq!(config.retry_delay(3), Duration::from_secs(540));
        assert_eq!(
            config.retry_delay(u32::MAX),
            Duration::from_millis(u64::MAX)
        );
    }
}
