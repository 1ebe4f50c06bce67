//! Bumping a build from the web UI moves it ahead of the queue: with one
//! slot busy, the bumped build is the next one built. The real driver,
//! a real agent, the web UI's own SQL.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::Deployment;

const JOBS: &str = r#"{
  first = mkDrv { name = "first"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 3; echo > $out" ]; };
  second = mkDrv { name = "second"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 1; echo > $out" ]; };
  third = mkDrv { name = "third"; PATH = "/usr/bin:/bin"; args = [ "-c" "sleep 1; echo > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bumped_build_is_built_next() {
    let mut d = Deployment::start().await;
    // No step held ahead: one taken ahead before the bump stays the
    // agent's (see `--prefetch`), and this is about the queue's order.
    d.add_agent_without_prefetch("only", 1).await;
    let drvs = d.env.instantiate(JOBS, &["first", "second", "third"]);
    let jobs: Vec<(String, String)> = ["first", "second", "third"]
        .iter()
        .zip(&drvs)
        .map(|(n, p)| (n.to_string(), p.clone()))
        .collect();
    let ids = d.submit(&jobs).await;

    d.wait_building(ids[0]).await;
    // Bump the last one, as the web UI does.
    sqlx::query("update Builds set globalPriority = extract(epoch from now())::int where id = $1")
        .bind(ids[2])
        .execute(&d.pool)
        .await
        .unwrap();

    d.wait_finished(&ids, 60).await;
    let starts: Vec<(i32, i32)> = sqlx::query_as(
        "select build, stepnr from BuildSteps where build = any($1) order by startTime, build",
    )
    .bind(&ids)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    let order: Vec<i32> = starts.iter().map(|(b, _)| *b).collect();
    assert_eq!(
        order,
        vec![ids[0], ids[2], ids[1]],
        "the bumped build went second"
    );
    d.stop().await;
}
