//! Helpers shared by the database tests (`db_steps.rs`, `db_builds.rs`):
//! a migrated throwaway database, a queued build, and step values.

#![allow(dead_code)]

use sluice_core::Status;
use sluice_queue_runner::db::migrate;
use sluice_queue_runner::db::results::{StepKind, StepPhase, StepResult, StepRow, StepState};
use sluice_test_support::pg::TestPg;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

pub const DRV: &str = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv";
pub const OUT: &str = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-hello";
pub const DOC: &str = "/nix/store/cccccccccccccccccccccccccccccccc-hello-doc";
pub const QUEUED_AT: i32 = 1_700_000_000;

/// `(build, stepnr, busy, status, stopTime, errorMsg)`
pub type StepSummary = (i32, i32, i32, Option<i32>, Option<i32>, Option<String>);
/// `(id, finished, buildStatus, startTime, stopTime, isCachedBuild,
/// notificationPendingSince)`
pub type BuildSummary = (
    i32,
    i32,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
    Option<i32>,
);
/// `BuildProducts` from `productnr` on.
pub type ProductRow = (
    i32,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);
/// `(name, unit, value, project, jobset, job, timestamp)`
pub type MetricRow = (String, Option<String>, f64, String, String, String, i32);

/// A migrated database with a user, project `p` and jobset `j`, and a pool.
pub async fn database() -> (TestPg, PgPool) {
    let pg = TestPg::start();
    let mut conn = PgConnection::connect(&pg.url()).await.expect("connect");
    migrate::migrate(&mut conn).await.expect("migrate");
    sqlx::raw_sql(
        "insert into Users (userName, emailAddress, password) values ('alice', 'a@example.org', '!');
         insert into Projects (name, displayName, owner) values ('p', 'P', 'alice');
         insert into Jobsets (project, name, emailOverride, nixExprInput, nixExprPath, type, schedulingShares)
           values ('p', 'j', '', 'src', 'release.nix', 0, 42);",
    )
    .execute(&mut conn)
    .await
    .expect("project and jobset");
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect(&pg.url())
        .await
        .expect("pool");
    (pg, pool)
}

/// Queues a build the way the evaluator does: the row and its outputs.
pub async fn queue_build(pool: &PgPool, job: &str, outputs: &[(&str, Option<&str>)]) -> i32 {
    let mut tx = pool.begin().await.expect("begin");
    let id: i32 = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system,
                             priority, globalPriority)
         select 0, $1, id, $2, $2 || '-1.0', $3, 'x86_64-linux', 5, 7 from Jobsets where name = 'j'
         returning id",
    )
    .bind(QUEUED_AT)
    .bind(job)
    .bind(DRV)
    .fetch_one(&mut *tx)
    .await
    .expect("build");
    for (name, path) in outputs {
        sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(path)
            .execute(&mut *tx)
            .await
            .expect("output");
    }
    tx.commit().await.expect("commit");
    id
}

pub fn busy_step(build: i32) -> StepRow {
    StepRow {
        build,
        step_type: StepKind::Build,
        drv_path: DRV.into(),
        system: "x86_64-linux".into(),
        machine: "builder-1".into(),
        state: StepState::Busy(StepPhase::Preparing),
        error_msg: None,
        start_time: Some(i64::from(QUEUED_AT) + 10),
        stop_time: None,
        propagated_from: None,
        outputs: vec![("out".into(), Some(OUT.into())), ("doc".into(), None)],
    }
}

// ---------------------------------------------------------------- ingestion

pub fn busy_result() -> StepResult {
    StepResult {
        status: Status::Success,
        error_msg: None,
        start_time: 1,
        stop_time: 1,
        machine: String::new(),
        overhead_ms: 0,
        times_built: 0,
        is_non_deterministic: false,
        outputs: Vec::new(),
        run: None,
    }
}

pub async fn stepnrs(pool: &PgPool, build: i32) -> Vec<i32> {
    sqlx::query_scalar("select stepnr from BuildSteps where build = $1 order by stepnr")
        .bind(build)
        .fetch_all(pool)
        .await
        .expect("stepnrs")
}
