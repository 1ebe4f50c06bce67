//! The `SystemStatus` row `queue-runner`: every `status-interval-s` the
//! latest status snapshot goes there as the JSON `/status` serves, for
//! web UIs that read the queue runner's status from the database (as
//! Hydra's did before its queue runner answered over HTTP).
//!
//! Invariants: the row is written by this task alone, through the shared
//! pool, one statement at a time under a deadline shorter than the
//! interval, so a database that is away or slow holds at most one
//! connection for a bounded time and delays nothing else: the driver and
//! the writer never wait for this task. A failure is logged once, and
//! again only after the row was written in between.

use std::time::Duration;

use tokio::sync::watch;

use crate::status::StatusSnapshot;

/// Runs until dropped (abort its task): writes the row at once, then every
/// `interval`.
pub fn spawn(
    pool: sqlx::PgPool,
    status: watch::Receiver<StatusSnapshot>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(pool, status, interval))
}

/// How long one write may take: within the interval, so writes never
/// queue up behind each other, and at least a second.
pub fn write_budget(interval: Duration) -> Duration {
    (interval * 4 / 5).max(Duration::from_secs(1))
}

async fn run(pool: sqlx::PgPool, status: watch::Receiver<StatusSnapshot>, interval: Duration) {
    let budget = write_budget(interval);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the last write failed: it is logged once per outage.
    let mut failing = false;
    loop {
        ticks.tick().await;
        let snapshot = status.borrow().clone();
        let json = crate::http::status_value(&snapshot).to_string();
        let written = tokio::time::timeout(
            budget,
            crate::db::dashboard::write_status(&pool, &json, budget),
        )
        .await;
        let error = match written {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(crate::db::describe_sqlx_error(&e)),
            Err(_) => Some(format!("no answer within {} ms", budget.as_millis())),
        };
        match (error, failing) {
            (Some(e), false) => {
                failing = true;
                tracing::warn!(
                    "writing the queue runner's status to SystemStatus failed: {e}; \
                     trying again every {} s",
                    interval.as_secs_f32()
                );
            }
            (None, true) => {
                failing = false;
                tracing::info!("the queue runner's status is written to SystemStatus again");
            }
            _ => {}
        }
    }
}
