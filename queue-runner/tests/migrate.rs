//! `migrate` against a real PostgreSQL: the contract's schema, idempotence,
//! notify triggers, and a database created by Hydra left alone.

use std::time::Duration;

use sluice_queue_runner::db::migrate::{self, HydraSchema, HYDRA_MIGRATIONS};
use sluice_test_support::pg::TestPg;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};

async fn connect(pg: &TestPg) -> PgConnection {
    PgConnection::connect(&pg.url()).await.expect("connect")
}

/// Every table and column the contract names, lower-cased as PostgreSQL stores them.
const CONTRACT_COLUMNS: &[(&str, &[&str])] = &[
    ("users", &["username", "emailaddress", "password"]),
    ("projects", &["name", "displayname", "owner", "enabled"]),
    (
        "jobsets",
        &[
            "id",
            "project",
            "name",
            "schedulingshares",
            "enabled",
            "emailoverride",
            "type",
            "nixexprinput",
            "nixexprpath",
            "flake",
        ],
    ),
    (
        "builds",
        &[
            "id",
            "finished",
            "timestamp",
            "jobset_id",
            "job",
            "nixname",
            "drvpath",
            "system",
            "maxsilent",
            "timeout",
            "priority",
            "globalpriority",
            "starttime",
            "stoptime",
            "iscachedbuild",
            "buildstatus",
            "size",
            "closuresize",
            "releasename",
            "notificationpendingsince",
        ],
    ),
    ("buildoutputs", &["build", "name", "path"]),
    (
        "buildsteps",
        &[
            "build",
            "stepnr",
            "type",
            "drvpath",
            "system",
            "machine",
            "busy",
            "status",
            "errormsg",
            "starttime",
            "stoptime",
            "propagatedfrom",
            "overhead",
            "timesbuilt",
            "isnondeterministic",
            "resolveddrvpath",
        ],
    ),
    ("buildstepoutputs", &["build", "stepnr", "name", "path"]),
    (
        "buildproducts",
        &[
            "build",
            "productnr",
            "type",
            "subtype",
            "filesize",
            "sha256hash",
            "path",
            "name",
            "defaultpath",
        ],
    ),
    (
        "buildmetrics",
        &[
            "build",
            "name",
            "unit",
            "value",
            "project",
            "jobset",
            "job",
            "timestamp",
        ],
    ),
    ("failedpaths", &["path"]),
    ("systemstatus", &["what", "status"]),
    ("nrbuilds", &["what", "count"]),
    (
        "jobsetevals",
        &["id", "jobset_id", "timestamp", "hasnewbuilds"],
    ),
    ("jobsetevalmembers", &["eval", "build", "isnew"]),
    ("schemaversion", &["version"]),
];

async fn columns_of(conn: &mut PgConnection, table: &str) -> Vec<String> {
    sqlx::query_scalar(
        "select column_name::text from information_schema.columns
         where table_schema = 'public' and table_name = $1 order by ordinal_position",
    )
    .bind(table)
    .fetch_all(conn)
    .await
    .expect("columns")
}

#[tokio::test]
async fn applies_twice_to_an_empty_database_with_the_contracts_schema() {
    let pg = TestPg::start();
    let mut conn = connect(&pg).await;
    let first = migrate::migrate(&mut conn).await.expect("first migrate");
    assert_eq!(first.hydra_schema, HydraSchema::Ours);
    assert!(
        first.applied.iter().any(|id| id.starts_with("hydra/")),
        "{first:?}"
    );
    let second = migrate::migrate(&mut conn).await.expect("second migrate");
    assert!(
        second.applied.is_empty(),
        "nothing to do the second time: {second:?}"
    );
    assert_eq!(second.hydra_schema, HydraSchema::Ours);

    for (table, wanted) in CONTRACT_COLUMNS {
        let have = columns_of(&mut conn, table).await;
        for col in *wanted {
            assert!(
                have.iter().any(|c| c == col),
                "{table}.{col} missing; have {have:?}"
            );
        }
    }
    let version: i32 = sqlx::query_scalar("select version from SchemaVersion")
        .fetch_one(&mut conn)
        .await
        .expect("version");
    assert_eq!(version, 87);
}

async fn queue_a_build(conn: &mut PgConnection) -> i32 {
    sqlx::raw_sql(
        "insert into Users (userName, emailAddress, password) values ('alice', 'a@example.org', '!');
         insert into Projects (name, displayName, owner) values ('p', 'P', 'alice');
         insert into Jobsets (project, name, emailOverride, nixExprInput, nixExprPath, type)
           values ('p', 'j', '', 'src', 'release.nix', 0);",
    )
    .execute(&mut *conn)
    .await
    .expect("project and jobset");
    sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system, priority, globalPriority)
         select 0, 1700000000, id, 'hello', 'hello', '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv', 'x86_64-linux', 0, 0
         from Jobsets where name = 'j' returning id",
    )
    .fetch_one(&mut *conn)
    .await
    .expect("build")
}

#[tokio::test]
async fn cancelling_a_build_fires_builds_cancelled() {
    let pg = TestPg::start();
    let mut conn = connect(&pg).await;
    migrate::migrate(&mut conn).await.expect("migrate");
    let id = queue_a_build(&mut conn).await;

    let mut listener = PgListener::connect(&pg.url()).await.expect("listener");
    listener
        .listen_all(["builds_cancelled", "builds_restarted", "builds_bumped"])
        .await
        .expect("listen");

    sqlx::query("update Builds set globalPriority = 5 where id = $1")
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("bump");
    sqlx::query(
        "update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = $1",
    )
    .bind(id)
    .execute(&mut conn)
    .await
    .expect("cancel");
    sqlx::query("update Builds set finished = 0, buildStatus = null where id = $1")
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("restart");

    let mut channels = Vec::new();
    for _ in 0..3 {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10s")
            .expect("recv");
        channels.push(n.channel().to_string());
    }
    assert_eq!(
        channels,
        ["builds_bumped", "builds_cancelled", "builds_restarted"]
    );
}

#[tokio::test]
async fn resolved_steps_need_a_resolved_drv_path_and_failed_paths_are_idempotent() {
    let pg = TestPg::start();
    let mut conn = connect(&pg).await;
    migrate::migrate(&mut conn).await.expect("migrate");
    let id = queue_a_build(&mut conn).await;
    let insert_step = |nr: i32, status: i32, resolved: Option<&'static str>| {
        sqlx::query(
            "insert into BuildSteps (build, stepnr, type, drvPath, busy, status, resolvedDrvPath, system)
             values ($1, $2, 0, '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv', 0, $3, $4, 'x86_64-linux')",
        )
        .bind(id)
        .bind(nr)
        .bind(status)
        .bind(resolved)
    };
    assert!(insert_step(1, 13, None).execute(&mut conn).await.is_err());
    assert!(
        insert_step(2, 0, Some("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x.drv"))
            .execute(&mut conn)
            .await
            .is_err()
    );
    insert_step(3, 13, Some("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x.drv"))
        .execute(&mut conn)
        .await
        .expect("a resolved step with its resolved path");

    for _ in 0..2 {
        sqlx::query("insert into FailedPaths (path) values ('/nix/store/cccccccccccccccccccccccccccccccc-f')")
            .execute(&mut conn)
            .await
            .expect("duplicate FailedPaths inserts are swallowed");
    }
}

/// Tables, columns, constraints, indexes and triggers, as one comparable text.
async fn schema_fingerprint(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "select 'col ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '')
           from information_schema.columns where table_schema = 'public' and table_name not like 'sluice%'
         union all
         select 'con ' || conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
           from pg_constraint where connamespace = 'public'::regnamespace and conrelid::regclass::text not like 'sluice%'
         union all
         select 'idx ' || indexdef from pg_indexes where schemaname = 'public' and tablename not like 'sluice%'
         union all
         select 'trg ' || pg_get_triggerdef(oid) from pg_trigger where not tgisinternal
         order by 1",
    )
    .fetch_all(conn)
    .await
    .expect("fingerprint")
}

/// A database as Hydra's `hydra-init` leaves it: Hydra's tables with
/// `SchemaVersion`, and no record of Sluice. Optionally at an older version.
async fn hydra_created_database(pg: &TestPg, version: i32) -> PgConnection {
    let mut conn = connect(pg).await;
    for m in HYDRA_MIGRATIONS {
        sqlx::raw_sql(m.sql)
            .execute(&mut conn)
            .await
            .expect("hydra schema");
    }
    sqlx::query("update SchemaVersion set version = $1")
        .bind(version)
        .execute(&mut conn)
        .await
        .expect("version");
    conn
}

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_queue-runner"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run queue-runner")
}

#[tokio::test]
async fn migrate_leaves_a_hydra_database_alone() {
    let pg = TestPg::start();
    let mut conn = hydra_created_database(&pg, 87).await;
    let before = schema_fingerprint(&mut conn).await;
    assert!(
        before.len() > 100,
        "the fingerprint sees the schema: {}",
        before.len()
    );

    for _ in 0..2 {
        let out = run_cli(&["migrate", "--database-url", &pg.url()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("created by Hydra"), "{stdout}");
    }
    let after = schema_fingerprint(&mut conn).await;
    assert_eq!(before, after, "Hydra's tables must not change");
    let version: i32 = sqlx::query_scalar("select version from SchemaVersion")
        .fetch_one(&mut conn)
        .await
        .expect("version");
    assert_eq!(version, 87);
}

#[tokio::test]
async fn migrate_refuses_a_hydra_database_too_old_for_us() {
    let pg = TestPg::start();
    let _conn = hydra_created_database(&pg, 80).await;
    let out = run_cli(&["migrate", "--database-url", &pg.url()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("schema version 80") && stderr.contains("hydra-init"),
        "{stderr}"
    );
}

/// The one line a failed `migrate` prints, checked for shape.
fn failing_migrate(url: &str) -> String {
    let out = run_cli(&["migrate", "--database-url", url, "--connect-timeout", "10"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "must fail: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn an_unreachable_host_is_one_line_naming_host_and_cause() {
    let msg = failing_migrate("postgres://hydra:secret@127.0.0.1:1/hydra");
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(!msg.contains("secret"), "never print the password: {msg}");
}

#[test]
fn a_malformed_url_is_one_line_naming_the_problem() {
    let msg = failing_migrate("postgres://hydra:secret@[::1/hydra");
    assert!(msg.contains("invalid database URL"), "{msg}");
    assert!(!msg.contains("secret"), "{msg}");
    let msg = failing_migrate("mysql://db.example.org/hydra");
    assert!(msg.contains("postgres://"), "{msg}");
}

#[tokio::test]
async fn a_wrong_password_is_one_line_naming_server_and_cause() {
    let pg = TestPg::start();
    let mut conn = connect(&pg).await;
    sqlx::raw_sql("create role alice login password 'right'")
        .execute(&mut conn)
        .await
        .expect("role");
    // Trust only the superuser; everyone else must give a password.
    let hba = pg.dir().join("data/pg_hba.conf");
    std::fs::write(
        &hba,
        "local all postgres trust\nlocal all all scram-sha-256\n",
    )
    .expect("pg_hba");
    sqlx::raw_sql("select pg_reload_conf()")
        .execute(&mut conn)
        .await
        .expect("reload");
    let url = pg.url().replace("postgres@", "alice:wrong@");
    let msg = failing_migrate(&url);
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(
        msg.contains(&pg.dir().join("sock").display().to_string()),
        "{msg}"
    );
    assert!(!msg.contains("wrong@"), "{msg}");
}

#[tokio::test]
async fn every_connection_of_ours_runs_with_a_statement_timeout() {
    let pg = TestPg::start();
    let pool = sluice_queue_runner::db::pool(&pg.url(), 2, std::time::Duration::from_secs(30))
        .await
        .expect("pool");
    let timeout: String = sqlx::query_scalar("show statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("shows the setting");
    assert_eq!(timeout, "1min");
}
