//! Retrying operations on the cache with exponential backoff.
//!
//! Invariant: an error that cannot pass by waiting (a path missing from
//! the store, a corrupt NAR, a request the server refuses as such) is
//! returned at once; only transient ones are retried, at most
//! `attempts` times in all.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (at least one).
    pub attempts: u32,
    /// The wait after the first failure; each later wait doubles, up to
    /// `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Five tries over about 15 s (1, 2, 4 and 8 s apart). A caller that
    /// must never give up (the driver: a build waits for its outputs to be
    /// in the cache) calls again.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Whether an object store error may pass by itself.
pub(crate) fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

impl RetryPolicy {
    /// Runs `op` until it succeeds, fails for good (`is_transient` says
    /// no), or the tries are used up; `what` names it in the log.
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        is_transient: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, E>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut delay = self.first_delay;
        let mut tried = 0;
        loop {
            tried += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if tried < self.attempts.max(1) && is_transient(&e) => {
                    tracing::warn!(
                        try_ = tried,
                        of = self.attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        "binary cache: {what}: {e}"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_delay);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success_or_the_last_try() {
        let calls = AtomicU32::new(0);
        let got: Result<u32, String> = quick(5)
            .run(
                "test",
                |_| true,
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    if n < 3 {
                        Err(format!("fail {n}"))
                    } else {
                        Ok(n)
                    }
                },
            )
            .await;
        assert_eq!(got, Ok(3));

        let calls = AtomicU32::new(0);
        let got: Result<(), String> = quick(4)
            .run(
                "test",
                |_| true,
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("down".to_string())
                },
            )
            .await;
        assert_eq!(got, Err("down".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let got: Result<(), String> = quick(5)
            .run(
                "test",
                |_| false,
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err("corrupt".to_string())
                },
            )
            .await;
        assert!(got.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn not_found_is_permanent_and_generic_errors_transient() {
        assert!(!transient(&object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }));
        assert!(transient(&object_store::Error::Generic {
            store: "S3",
            source: "503".into(),
        }));
    }
}
