//! Queries about builds the queue runner already holds in memory: which of
//! them are still unfinished, and at which global priority. Used on
//! `builds_cancelled`, `builds_deleted` and `builds_bumped`, whose payloads
//! are empty.

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
