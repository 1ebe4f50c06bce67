//! Loading a queue in many small batches, each read while the one before
//! is applied: builds of a later batch that need steps an earlier batch
//! brought share them (one step, built once), and every build finishes.
//! Real PostgreSQL, a real agent with its own store, the real driver.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::Deployment;

/// `base` under two middles, and tops over them: with batches of two
/// builds, in the order submitted, a batch reads past derivations of the
/// batch before it while that one is still being applied.
const JOBS: &str = r#"rec {
  base = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-base"; args = [ "-c" "echo base > $out" ]; };
  mid1 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-mid1"; b = base; args = [ "-c" "cat $b > $out; echo 1 >> $out" ]; };
  mid2 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-mid2"; b = base; args = [ "-c" "cat $b > $out; echo 2 >> $out" ]; };
  t1 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t1"; m = mid1; args = [ "-c" "cat $m > $out" ]; };
  t2 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t2"; m = mid1; args = [ "-c" "cat $m > $out; echo t2 >> $out" ]; };
  t3 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t3"; m = mid2; n = mid1; args = [ "-c" "cat $m $n > $out" ]; };
  t4 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t4"; m = mid2; args = [ "-c" "cat $m > $out; echo t4 >> $out" ]; };
  t5 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t5"; m = t3; args = [ "-c" "cat $m > $out" ]; };
  t6 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-t6"; m = t1; n = t4; args = [ "-c" "cat $m $n > $out" ]; };
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_loaded_in_overlapping_batches_share_their_steps() {
    let mut d = Deployment::start_with(|c| c.load_batch = 2).await;
    let attrs = ["mid1", "t1", "t2", "mid2", "t3", "t4", "t5", "t6", "base"];
    let ids = d.submit_attrs(JOBS, &attrs).await;
    d.add_agent("a1", 2).await;
    let statuses = d.wait_finished(&ids, 180).await;
    assert!(statuses.values().all(|s| *s == 0), "{statuses:?}");

    // Each derivation was built once, whatever batch brought it.
    let built: Vec<(String, i64)> = sqlx::query_as(
        "select drvPath, count(*) from BuildSteps
         where build = any($1) and status = 0 and busy = 0
         group by drvPath order by drvPath",
    )
    .bind(&ids)
    .fetch_all(&d.pool)
    .await
    .unwrap();
    assert_eq!(built.len(), attrs.len(), "{built:?}");
    assert!(built.iter().all(|(_, n)| *n == 1), "{built:?}");
    d.stop().await;
}

/// `doomed` needs `shared` and `victim`, whose `.drv` the test makes
/// malformed; `u1`..`u3` need `shared` alone.
const DOOMED: &str = r#"rec {
  shared = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-shared"; args = [ "-c" "echo shared > $out" ]; };
  victim = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-victim"; args = [ "-c" "echo victim > $out" ]; };
  doomed = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-doomed"; s = shared; v = victim; args = [ "-c" "cat $s $v > $out" ]; };
  u1 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-u1"; s = shared; args = [ "-c" "cat $s > $out; echo 1 >> $out" ]; };
  u2 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-u2"; s = shared; args = [ "-c" "cat $s > $out; echo 2 >> $out" ]; };
  u3 = mkDrv { PATH = "/usr/bin:/bin"; name = "lb-u3"; s = shared; args = [ "-c" "cat $s > $out; echo 3 >> $out" ]; };
}"#;

/// Puts a file's bytes back when dropped.
struct Restore(String, Vec<u8>);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// The first batch brings `shared`, but its only build is aborted (an
/// input is malformed), so `shared` gets no step. The loads after it,
/// each read while the one before is applied and each extending the copy
/// of held derivations the one before was given, are told `shared` is
/// held and find it is not: every build that needs `shared` is loaded
/// again, from a fresh copy, and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derivation_an_aborted_build_left_without_a_step_is_loaded_again_by_later_batches() {
    let mut d = Deployment::start_with(|c| c.load_batch = 1).await;
    let attrs = ["victim", "doomed", "u1", "u2", "u3"];
    let drvs = d.env.instantiate(DOOMED, &attrs);
    let victim = drvs[0].clone();
    let original = std::fs::read(&victim).unwrap();
    let _restore = Restore(victim.clone(), original);
    std::fs::write(&victim, b"Derive([(\"out\",garbage").unwrap();

    let jobs: Vec<(String, String)> = attrs[1..]
        .iter()
        .zip(&drvs[1..])
        .map(|(name, drv)| (name.to_string(), drv.clone()))
        .collect();
    let ids = d.submit(&jobs).await;
    d.add_agent("a1", 2).await;
    let statuses = d.wait_finished(&ids, 180).await;
    assert_eq!(statuses[&ids[0]], 3, "doomed is aborted: {statuses:?}");
    for id in &ids[1..] {
        assert_eq!(statuses[id], 0, "{statuses:?}");
    }
    assert!(
        d.only_step_error(ids[0]).await.contains(victim.as_str()),
        "the abort names the malformed file"
    );
    d.stop().await;
}
