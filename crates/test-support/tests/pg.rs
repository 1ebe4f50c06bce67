//! The throwaway PostgreSQL really starts, serves, is private, and goes away.

use std::time::Duration;

use sluice_pg_embed::{PgConfig, PgError, PgServer};
use sluice_test_support::pg::TestPg;
use sqlx::Connection;

#[tokio::test]
async fn throwaway_server_serves_queries_and_is_removed_on_drop() {
    let pg = TestPg::start();
    let dir = pg.dir().to_path_buf();
    let mut conn = sqlx::PgConnection::connect(&pg.url())
        .await
        .expect("connect");
    let (one,): (i32,) = sqlx::query_as("select 1")
        .fetch_one(&mut conn)
        .await
        .expect("query");
    assert_eq!(one, 1);
    let listen: String = sqlx::query_scalar("show listen_addresses")
        .fetch_one(&mut conn)
        .await
        .expect("show");
    assert_eq!(listen, "", "the server must listen on its Unix socket only");
    conn.close().await.expect("close");
    drop(pg);
    assert!(
        !dir.exists(),
        "the server's directory must be removed on drop"
    );
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let (a, b) = (TestPg::start(), TestPg::start());
    let mut ca = sqlx::PgConnection::connect(&a.url())
        .await
        .expect("connect a");
    let mut cb = sqlx::PgConnection::connect(&b.url())
        .await
        .expect("connect b");
    sqlx::query("create table only_in_a (x int)")
        .execute(&mut ca)
        .await
        .expect("create");
    let in_b: Option<String> = sqlx::query_scalar("select to_regclass('only_in_a')::text")
        .fetch_one(&mut cb)
        .await
        .expect("query b");
    assert_eq!(in_b, None);
}

#[test]
fn server_stops_when_dropped_during_a_panic() {
    let socket = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let pg = TestPg::start();
        *socket.lock().expect("lock") = Some(pg.dir().join("sock/.s.PGSQL.5432"));
        panic!("a failing test");
    });
    assert!(result.is_err());
    let socket = socket
        .lock()
        .expect("lock")
        .clone()
        .expect("socket path recorded");
    assert!(
        sluice_test_support::wait_until(Duration::from_secs(5), || !socket.exists()),
        "the server must be gone after a panicking test"
    );
}

#[test]
fn missing_binaries_say_what_is_missing_and_how_to_get_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let mut config = PgConfig::new(empty.path().join("data"), empty.path().join("sock"));
    config.bin_dir = Some(empty.path().to_path_buf());
    let err = PgServer::start(&config).expect_err("no binaries there");
    assert!(matches!(err, PgError::BinariesNotFound { .. }));
    let msg = err.to_string();
    assert!(msg.contains("initdb"), "{msg}");
    assert!(msg.contains("apt-get install -y postgresql"), "{msg}");
}

#[test]
fn missing_user_says_how_to_create_it() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // only root drops to another user
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = PgConfig::new(dir.path().join("data"), dir.path().join("sock"));
    config.run_as = sluice_pg_embed::RunAs::Existing("no-such-user-sluice".into());
    let err = PgServer::start(&config).expect_err("user is missing");
    assert!(err.to_string().contains("useradd"), "{err}");
}

#[test]
fn a_server_that_exits_while_it_is_adopted_is_replaced_by_a_fresh_one() {
    let dir = tempfile::Builder::new()
        .prefix("sluice-pg-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    sluice_pg_embed::make_traversable(dir.path()).expect("traversable");
    let user = std::env::var("SLUICE_TEST_PG_USER").unwrap_or_else(|_| "nobody".into());
    let mut config = PgConfig::new(dir.path().join("data"), dir.path().join("sock"));
    config.run_as = sluice_pg_embed::RunAs::Existing(user);
    config.unsafe_fast = true;
    config.existing = sluice_pg_embed::ExistingServer::Adopt;
    // A cluster, stopped cleanly.
    let mut first = PgServer::start(&config).expect("starts");
    first.stop();
    // Its lock file now names a "postgres" on its way out (a server
    // killed an instant ago): alive when the next start looks, gone soon.
    let fake = dir.path().join("postgres");
    std::fs::copy("/bin/sleep", &fake).expect("copies sleep");
    // A process another test forks at this instant holds the copy's write
    // descriptor until it execs: running it fails with ETXTBSY meanwhile.
    let mut tries = 0;
    let mut dying = loop {
        match std::process::Command::new(&fake).arg("1").spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => break spawned.expect("runs"),
        }
    };
    let lock = dir.path().join("data/postmaster.pid");
    std::fs::write(
        &lock,
        format!("{}\n{}\n", dying.id(), dir.path().join("data").display()),
    )
    .expect("writes the lock");
    let mut server = PgServer::start(&config).expect("a fresh server replaces the one that exited");
    assert!(!server.was_adopted());
    let _ = dying.wait();
    server.create_database("after").expect("serves");
    server.stop();
}
