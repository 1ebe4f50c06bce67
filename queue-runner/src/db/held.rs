//! Queries about builds the queue runner already holds in memory: which of
//! them are still unfinished, and at which global priority. Used on
//! `builds_cancelled`, `builds_deleted` and `builds_bumped`, whose payloads
//! are empty; and the jobsets' scheduling shares, on
//! `jobset_shares_changed`.

use sqlx::PgPool;

/// `(id, globalPriority)` of the unfinished builds among `ids`.
pub async fn unfinished_priorities(
    pool: &PgPool,
    ids: &[i32],
) -> Result<Vec<(i32, i32)>, sqlx::Error> {
    sqlx::query_as("select id, globalPriority from Builds where id = any($1) and finished = 0")
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// `(id, schedulingShares)` of every jobset, on `jobset_shares_changed`
/// (whose payload is empty). One row per jobset: a few thousand at most.
pub async fn jobset_shares(pool: &PgPool) -> Result<Vec<(i32, i32)>, sqlx::Error> {
    sqlx::query_as("select id, schedulingShares from Jobsets")
        .fetch_all(pool)
        .await
}
