//! An agent whose connection to the queue runner drops mid-build: within
//! the lease its build goes on and is delivered (log, output, result) on
//! the next session; past the lease the step is retried and the old
//! attempt's late result changes nothing. Real agents in their own stores,
//! real gRPC through a TCP proxy the test cuts.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::Deployment;

const JOBS: &str = r#"rec {
  slow = mkDrv { PATH = "/usr/bin:/bin"; name = "slow"; args = [ "-c" "echo started slow; sleep 6; echo finished slow; echo slow > $out" ]; };
}"#;

/// A TCP proxy in front of the queue runner's gRPC port.
struct Proxy {
    addr: std::net::SocketAddr,
    target: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    links: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            target,
            task: None,
            links: Default::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let links = self.links.clone();
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links.lock().unwrap().push(link.abort_handle());
            }
        }));
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones.
    fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts again, on the same port.
    async fn restore(&mut self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

/// Rows of the build's steps: status, error.
async fn rows(d: &Deployment, build: i32) -> Vec<(Option<i32>, Option<String>)> {
    sqlx::query_as("select status, errorMsg from BuildSteps where build = $1 order by stepnr")
        .bind(build)
        .fetch_all(&d.pool)
        .await
        .unwrap()
}

async fn output_of(d: &Deployment, build: i32) -> String {
    let (path,): (String,) =
        sqlx::query_as("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(build)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_whose_connection_drops_within_the_lease_is_delivered_on_the_next_session() {
    let mut d = Deployment::start().await;
    let mut proxy = Proxy::start(d.bound.grpc).await;
    d.add_agent_via("a1", 1, proxy.url()).await;
    let ids = d.submit_attrs(JOBS, &["slow"]).await;
    d.wait_building(ids[0]).await;
    let (drv,): (String,) = sqlx::query_as("select drvPath from Builds where id = $1")
        .bind(ids[0])
        .fetch_one(&d.pool)
        .await
        .unwrap();

    // Down for less than the lease (5 s here); the build ends meanwhile.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore().await;

    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 0);
    // One attempt, one row, and one build: its log has both halves, and
    // its output came up to the queue runner's store.
    assert_eq!(rows(&d, ids[0]).await, [(Some(0), None)]);
    let log = std::fs::read_to_string(
        sluice_queue_runner::logs::log_path(d.data_dir.path(), &drv).unwrap(),
    )
    .unwrap();
    assert_eq!(log.matches("started slow").count(), 1, "{log:?}");
    assert!(log.contains("finished slow"), "{log:?}");
    let out = output_of(&d, ids[0]).await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "slow\n");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_lease_the_step_is_retried_and_the_old_result_changes_nothing() {
    let mut d = Deployment::start().await;
    let mut proxy = Proxy::start(d.bound.grpc).await;
    d.add_agent_via("a1", 1, proxy.url()).await;
    let ids = d.submit_attrs(JOBS, &["slow"]).await;
    d.wait_building(ids[0]).await;

    // Down past the lease: the queue runner gives the attempt up.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(9)).await;
    proxy.restore().await;

    let statuses = d.wait_finished(&ids, 90).await;
    assert_eq!(statuses[&ids[0]], 0);
    let rows = rows(&d, ids[0]).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, Some(3), "{rows:?}");
    assert!(
        rows[0].1.as_deref().unwrap_or("").contains("lease"),
        "{rows:?}"
    );
    assert_eq!(rows[1], (Some(0), None));
    let (successes,): (i64,) =
        sqlx::query_as("select count(*) from BuildSteps where build = $1 and status = 0")
            .bind(ids[0])
            .fetch_one(&d.pool)
            .await
            .unwrap();
    assert_eq!(successes, 1);
    d.stop().await;
}
