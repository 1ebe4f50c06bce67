//! Dispatch takes an input's output paths from memory: once a step is
//! built, the steps that need it are assigned without reading its `.drv`
//! again. The real driver, PostgreSQL, gRPC and an agent with its own
//! store; the proof is that the input's `.drv` file is gone from the queue
//! runner's store while its dependent is dispatched.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::Deployment;

const JOBS: &str = r#"rec {
  a = mkDrv { PATH = "/usr/bin:/bin"; name = "a"; args = [ "-c" "sleep 2; echo a > $out" ]; };
  b = mkDrv { PATH = "/usr/bin:/bin"; name = "b"; input = a; args = [ "-c" "cat $input > $out" ]; };
}"#;

/// Puts a `.drv` file back where it was when dropped, also on a panic.
struct Aside {
    path: std::path::PathBuf,
    aside: std::path::PathBuf,
}

impl Drop for Aside {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.aside, &self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_is_dispatched_without_reading_its_inputs_drv() {
    let mut d = Deployment::start().await;
    d.add_agent("builder", 1).await;
    let drvs = d.env.instantiate(JOBS, &["a", "b"]);
    let (a_drv, b_drv) = (drvs[0].clone(), drvs[1].clone());
    let build = d
        .submit(&[("b".to_string(), b_drv.clone())])
        .await
        .remove(0);
    // a builds (its own `.drv` was read for its assignment); then its
    // `.drv` goes away until the end of the test.
    d.wait_building(build).await;
    let running: String = sqlx::query_scalar(
        "select drvPath from BuildSteps where build = $1 and busy >= 30 limit 1",
    )
    .bind(build)
    .fetch_one(&d.pool)
    .await
    .unwrap();
    assert_eq!(running, a_drv, "a is built first");
    let path = std::path::PathBuf::from(&a_drv);
    let aside = path.with_extension("drv-aside");
    std::fs::rename(&path, &aside).unwrap();
    let _restore = Aside {
        path: path.clone(),
        aside,
    };

    let finished = d.wait_finished(&[build], 60).await;
    assert_eq!(finished[&build], 0, "b is built after a, from memory");
    let steps: Vec<(String, i32)> =
        sqlx::query_as("select drvPath, status from BuildSteps where build = $1 order by stepnr")
            .bind(build)
            .fetch_all(&d.pool)
            .await
            .unwrap();
    assert_eq!(steps, vec![(a_drv, 0), (b_drv, 0)], "each step built once");
    d.stop().await;
}
