//! A PostgreSQL outage while builds run and finish: the results wait in
//! the queue runner and are written when the database is back. Real
//! PostgreSQL (stopped and started again), real agents, the real driver.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{http_get, Deployment};

const JOBS: &str = r#"rec {
  ok1 = mkDrv { PATH = "/usr/bin:/bin"; name = "ok1"; args = [ "-c" "sleep 2; echo one > $out" ]; };
  ok2 = mkDrv { PATH = "/usr/bin:/bin"; name = "ok2"; args = [ "-c" "sleep 2; echo two > $out" ]; };
  bad = mkDrv { PATH = "/usr/bin:/bin"; name = "bad"; args = [ "-c" "sleep 2; echo broken; exit 1" ]; };
  needsBad = mkDrv { PATH = "/usr/bin:/bin"; name = "needs-bad"; dep = bad; args = [ "-c" "cat $dep > $out" ]; };
}"#;

/// The `queueRunner` object of `/status`.
async fn status(d: &Deployment) -> serde_json::Value {
    let body = http_get(d.bound.http, "/status").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["queueRunner"].clone()
}

/// Polls `/status` until `pred` holds; panics with the last status after `secs`.
async fn wait_status(d: &Deployment, secs: u64, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = status(d).await;
        if pred(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Queues the builds of `JOBS` (ok1, ok2, bad, needs-bad) and waits until
/// the three leaves have busy rows; returns the ids.
async fn submit_jobs_until_leaves_build(d: &Deployment) -> Vec<i32> {
    let drvs = d.env.instantiate(JOBS, &["ok1", "ok2", "bad", "needsBad"]);
    let jobs: Vec<(String, String)> = ["ok1", "ok2", "bad", "needs-bad"]
        .iter()
        .zip(&drvs)
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect();
    let ids = d.submit(&jobs).await;
    wait_busy_rows(d, &ids, 3).await;
    ids
}

/// Waits until `n` steps of the builds `ids` have busy rows: their
/// assignments went out (an assignment is sent once its row exists).
async fn wait_busy_rows(d: &Deployment, ids: &[i32], n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (busy,): (i64,) =
            sqlx::query_as("select count(*) from BuildSteps where busy <> 0 and build = any($1)")
                .bind(ids)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        if busy == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "steps never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_finish_while_postgresql_is_down_are_written_when_it_is_back() {
    let mut d = Deployment::start().await;
    d.add_agent("a1", 3).await;
    let ids = submit_jobs_until_leaves_build(&d).await;

    // The outage: every result arrives while the database is down.
    d.pg.stop();
    wait_status(&d, 60, |s| {
        s["nrStepsDone"].as_u64() >= Some(3) && s["databaseUp"] == false
    })
    .await;
    let during = status(&d).await;
    assert!(during["nrPendingWrites"].as_u64() >= Some(1), "{during}");
    assert!(during["databaseDownSince"].is_i64(), "{during}");
    // Stay down a little longer: the writer keeps retrying meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    d.pg.start_again();

    let statuses = d.wait_finished(&ids, 120).await;
    assert_eq!(statuses[&ids[0]], 0, "ok1");
    assert_eq!(statuses[&ids[1]], 0, "ok2");
    assert_eq!(statuses[&ids[2]], 1, "bad failed");
    assert_eq!(statuses[&ids[3]], 2, "its dependent failed");
    wait_status(&d, 30, |s| {
        s["databaseUp"] == true && s["nrPendingWrites"].as_u64() == Some(0)
    })
    .await;

    // Nothing busy, nothing doubled, and the real results recorded.
    let (busy,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where busy <> 0 or status is null")
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(busy, 0, "a step row stayed busy");
    let doubled: Vec<(String,)> = sqlx::query_as(
        "select drvPath from BuildSteps where status = 0 group by drvPath having count(*) > 1",
    )
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert!(doubled.is_empty(), "built twice: {doubled:?}");
    let (bad_status, machine): (Option<i32>, String) =
        sqlx::query_as("select status, machine from BuildSteps where build = $1 and stepnr = 1")
            .bind(ids[2])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(bad_status, Some(1));
    assert_eq!(machine, "a1");
    let (paths,): (i64,) = sqlx::query_as(
        "select count(*) from BuildOutputs where build = any($1) and path is not null",
    )
    .bind(&ids[..2])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(paths, 2);
    d.stop().await;
}

const MANY: &str = r#"{
  b1 = mkDrv { PATH = "/usr/bin:/bin"; name = "b1"; args = [ "-c" "sleep 3; echo 1 > $out" ]; };
  b2 = mkDrv { PATH = "/usr/bin:/bin"; name = "b2"; args = [ "-c" "sleep 3; echo 2 > $out" ]; };
  b3 = mkDrv { PATH = "/usr/bin:/bin"; name = "b3"; args = [ "-c" "sleep 3; echo 3 > $out" ]; };
  b4 = mkDrv { PATH = "/usr/bin:/bin"; name = "b4"; args = [ "-c" "sleep 3; echo 4 > $out" ]; };
  b5 = mkDrv { PATH = "/usr/bin:/bin"; name = "b5"; args = [ "-c" "sleep 3; echo 5 > $out" ]; };
  b6 = mkDrv { PATH = "/usr/bin:/bin"; name = "b6"; args = [ "-c" "sleep 3; echo 6 > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_write_queue_pauses_dispatch_and_loses_nothing() {
    // Room for one queued write: an outage fills it at once.
    let mut d = Deployment::start_with(|c| c.max_pending_writes = 1).await;
    // No steps held ahead: two run, and the rest wait for dispatch.
    d.add_agent_without_prefetch("a1", 2).await;
    let ids = d
        .submit_attrs(MANY, &["b1", "b2", "b3", "b4", "b5", "b6"])
        .await;
    wait_busy_rows(&d, &ids, 2).await;

    d.pg.stop();
    // The writes back up behind the outage, and dispatching pauses: the
    // steps already running finish, the rest wait.
    wait_status(&d, 60, |s| {
        s["databaseUp"] == false && s["nrPendingWrites"].as_u64() >= Some(2)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = status(&d).await;
    assert!(
        during["nrStepsDone"].as_u64() <= Some(4),
        "dispatching went on during the outage: {during}"
    );
    d.pg.start_again();

    let statuses = d.wait_finished(&ids, 120).await;
    assert!(statuses.values().all(|s| *s == 0), "{statuses:?}");
    wait_status(&d, 30, |s| s["nrPendingWrites"].as_u64() == Some(0)).await;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "select build, count(*) from BuildSteps where build = any($1) and status = 0 group by build",
    )
    .bind(&ids)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 6, "{rows:?}");
    assert!(rows.iter().all(|(_, n)| *n == 1), "{rows:?}");
    let (busy,): (i64,) = sqlx::query_as("select count(*) from BuildSteps where busy <> 0")
        .fetch_one(&d.pool)
        .await
        .unwrap();
    assert_eq!(busy, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_writes_what_waited_in_the_backlog() {
    let mut d = Deployment::start_with(|c| c.max_pending_writes = 1).await;
    // No steps held ahead: exactly the two running ones finish during the
    // outage.
    d.add_agent_without_prefetch("a1", 2).await;
    let ids = d.submit_attrs(MANY, &["b1", "b2", "b3", "b4"]).await;
    // Their rows exist, so they build, and finish during the outage.
    wait_busy_rows(&d, &ids, 2).await;

    // Results pile up behind an outage, past the one-write queue.
    d.pg.stop();
    wait_status(&d, 60, |s| {
        s["nrStepsDone"].as_u64() >= Some(2) && s["nrPendingWrites"].as_u64() >= Some(3)
    })
    .await;
    // The queue runner is stopped while the database is still away; it
    // comes back within the shutdown timeout (10 s here): what waited in
    // the backlog must still be written before the queue runner exits.
    let stopping = d.begin_stopping_queue_runner();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.pg.start_again();
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let (recorded,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where build = any($1) and status = 0")
            .bind(&ids)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(recorded, 2, "both results that arrived during the outage");
    d.stop().await;
}

/// A Unix-socket proxy in front of PostgreSQL: the queue runner connects
/// through it, so cutting it is an outage for the queue runner alone while
/// the test's own connections (straight to the server) stay up.
struct Proxy {
    dir: tempfile::TempDir,
    target: std::path::PathBuf,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

const SOCKET: &str = ".s.PGSQL.5432";

impl Proxy {
    /// A proxy to the server of `url` (`…?host=<socket dir>`), accepting.
    fn start(url: &str) -> Proxy {
        let host = url.split("host=").nth(1).unwrap();
        let mut proxy = Proxy {
            dir: tempfile::tempdir().unwrap(),
            target: std::path::Path::new(host).join(SOCKET),
            up: Default::default(),
            task: None,
            links: Default::default(),
        };
        proxy.restore();
        proxy
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/sluice?host={}",
            self.dir.path().display()
        )
    }

    /// Closes every proxied connection and refuses new ones.
    fn cut(&mut self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_file(self.dir.path().join(SOCKET));
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts again.
    fn restore(&mut self) {
        let path = self.dir.path().join(SOCKET);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let target = self.target.clone();
        let links = self.links.clone();
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let target = target.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::UnixStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links.lock().unwrap().push(link.abort_handle());
            }
        }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_arrive_once_and_after_their_rows_across_an_outage() {
    let mut proxy = None;
    let mut d = Deployment::start_with(|c| {
        let p = Proxy::start(c.database_url.as_deref().unwrap());
        c.database_url = Some(p.url());
        proxy = Some(p);
    })
    .await;
    let mut proxy = proxy.unwrap();
    // Straight to the server: it hears every notification, outage or not.
    let mut listener = sqlx::postgres::PgListener::connect(&d.pg.url())
        .await
        .unwrap();
    listener
        .listen_all(["step_finished", "build_finished"])
        .await
        .unwrap();
    d.add_agent("a1", 3).await;
    let ids = submit_jobs_until_leaves_build(&d).await;

    // The outage: the leaves finish while the queue runner cannot write.
    proxy.cut();
    wait_status(&d, 60, |s| {
        s["nrStepsDone"].as_u64() >= Some(3) && s["databaseUp"] == false
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();

    // Each notification, as it arrives, finds its row already written.
    let mut steps = std::collections::BTreeMap::<(i32, i32), u32>::new();
    let mut builds = std::collections::BTreeMap::<i32, u32>::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while builds.len() < ids.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let n = tokio::time::timeout(left, listener.recv())
            .await
            .expect("every build_finished arrives")
            .unwrap();
        let fields: Vec<i32> = n
            .payload()
            .split('\t')
            .map_while(|f| f.parse().ok())
            .collect();
        match n.channel() {
            "step_finished" => {
                let (build, stepnr) = (fields[0], fields[1]);
                let (busy, status): (i32, Option<i32>) = sqlx::query_as(
                    "select busy, status from BuildSteps where build = $1 and stepnr = $2",
                )
                .bind(build)
                .bind(stepnr)
                .fetch_one(&d.pool)
                .await
                .unwrap();
                assert!(
                    busy == 0 && status.is_some(),
                    "step_finished before its row: {n:?}"
                );
                *steps.entry((build, stepnr)).or_default() += 1;
            }
            _ => {
                for build in fields {
                    let (finished,): (i32,) =
                        sqlx::query_as("select finished from Builds where id = $1")
                            .bind(build)
                            .fetch_one(&d.pool)
                            .await
                            .unwrap();
                    assert_eq!(finished, 1, "build_finished before its row: {n:?}");
                    *builds.entry(build).or_default() += 1;
                }
            }
        }
    }
    // A moment for any duplicate to show up.
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        panic!("a notification came after every build finished: {n:?}");
    }
    assert!(
        builds.values().all(|n| *n == 1),
        "build_finished more than once: {builds:?}"
    );
    assert!(
        steps.values().all(|n| *n == 1),
        "step_finished more than once: {steps:?}"
    );
    let (finished_steps,): (i64,) = sqlx::query_as(
        "select count(*) from BuildSteps where build = any($1) and busy = 0 and stepnr is not null
           and startTime is not null and machine <> '' and propagatedFrom is null",
    )
    .bind(&ids)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(
        steps.len() as i64,
        finished_steps,
        "one step_finished per built step"
    );
    let statuses = d.wait_finished(&ids, 10).await;
    assert_eq!(
        statuses.values().copied().collect::<Vec<_>>(),
        [0, 0, 1, 2],
        "{statuses:?}"
    );
    d.stop().await;
}
