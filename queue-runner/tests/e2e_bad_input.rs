//! Builds the queue runner cannot read: a `.drv` that is missing, one that
//! is not a derivation, a dependency cycle, an input outside the store,
//! and an undecodable `Builds` row. Each is aborted (status 3) with a
//! message naming the file or the reason, and the builds beside them go on.
//! The real driver, PostgreSQL and Nix store.

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use harness::Deployment;
use sluice_queue_runner::db::evaluator::{queue_builds, NewBuild};

fn build(job: &str, drv_path: &str) -> NewBuild {
    NewBuild {
        job: job.into(),
        nix_name: job.into(),
        drv_path: drv_path.into(),
        system: "x86_64-linux".into(),
        outputs: vec![("out".into(), None)],
        max_silent_s: NewBuild::DEFAULT_LIMITS.0,
        timeout_s: NewBuild::DEFAULT_LIMITS.1,
    }
}

/// Queues `builds` in jobset bad:input as an evaluator does; returns ids.
async fn queue(d: &Deployment, builds: &[NewBuild]) -> Vec<i32> {
    let ids = queue_builds(
        &d.pool,
        "bad",
        "input",
        builds,
        sluice_queue_runner::driver::unix_now(),
    )
    .await
    .unwrap();
    sqlx::query("notify builds_added")
        .execute(&d.pool)
        .await
        .unwrap();
    ids
}

/// Removes a file on drop, also when the test fails.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_derivations_abort_only_their_builds_naming_the_file() {
    let d = Deployment::start().await;
    let nonce = d.env.nonce().to_string();
    // Store paths in form, with this run's nonce in the name.
    let hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let missing = format!("/nix/store/{hash}-missing-{nonce}.drv");
    let malformed = format!("/nix/store/{hash}-malformed-{nonce}.drv");
    std::fs::write(&malformed, b"Derive([(\"out\",garbage").unwrap();
    let _cleanup = RemoveOnDrop(malformed.clone().into());

    // A good build in the same load: its outputs are valid already.
    let good = d
        .env
        .instantiate(
            r#"{ x = mkDrv { name = "good"; args = [ "-c" "echo hi > $out" ]; }; }"#,
            &["x"],
        )
        .remove(0);
    d.env.realise(&good);
    let good_out = sluice_test_support::nix::run(
        std::process::Command::new("nix-store")
            .args(["-q", "--outputs", &good])
            .env("NIX_CONFIG", sluice_test_support::nix::NIX_CONFIG),
    );
    let mut good_build = build("good", &good);
    good_build.outputs = vec![("out".into(), Some(good_out.trim().to_string()))];

    let ids = queue(
        &d,
        &[
            build("missing", &missing),
            build("malformed", &malformed),
            good_build,
        ],
    )
    .await;

    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 3, "missing");
    assert_eq!(statuses[&ids[1]], 3, "malformed");
    assert_eq!(statuses[&ids[2]], 0, "the good build beside them");
    for (id, file) in [(ids[0], &missing), (ids[1], &malformed)] {
        let (status, error): (Option<i32>, Option<String>) =
            sqlx::query_as("select status, errorMsg from BuildSteps where build = $1")
                .bind(id)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        assert_eq!(status, Some(3));
        let error = error.unwrap_or_default();
        assert!(error.contains(file.as_str()), "{error}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_builds_row_aborts_that_build_alone() {
    let d = Deployment::start().await;
    let good = |name: &str| {
        let drv = d
            .env
            .instantiate(
                &format!(
                    r#"{{ x = mkDrv {{ name = "{name}"; args = [ "-c" "echo hi > $out" ]; }}; }}"#
                ),
                &["x"],
            )
            .remove(0);
        d.env.realise(&drv);
        drv
    };
    let first = good("first-good");
    let ids = d.submit(&[("first".into(), first.clone())]).await;
    assert_eq!(d.wait_finished(&ids, 30).await[&ids[0]], 0);

    // A row Hydra's schema would refuse: a NULL priority.
    sqlx::query("alter table Builds alter column priority drop not null")
        .execute(&d.pool)
        .await
        .unwrap();
    let bad: i32 = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system,
                             maxsilent, timeout, isCurrent, priority, globalPriority)
         select 0, timestamp, jobset_id, 'undecodable', nixName, drvPath, system,
                3600, 36000, 1, null, 0 from Builds where id = $1
         returning id",
    )
    .bind(ids[0])
    .fetch_one(&d.pool)
    .await
    .unwrap();
    sqlx::query("notify builds_added")
        .execute(&d.pool)
        .await
        .unwrap();
    let statuses = d.wait_finished(&[bad], 30).await;
    assert_eq!(statuses[&bad], 3);
    let error: Option<String> =
        sqlx::query_scalar("select errorMsg from BuildSteps where build = $1")
            .bind(bad)
            .fetch_one(&d.pool)
            .await
            .unwrap();
    let error = error.unwrap_or_default();
    assert!(error.contains("cannot be read"), "{error}");

    // Builds queued after it still load and finish.
    let second = good("second-good");
    let later = d.submit(&[("second".into(), second)]).await;
    assert_eq!(d.wait_finished(&later, 30).await[&later[0]], 0);
    d.stop().await;
}

/// A derivation as ATerm with one output and the given inputs.
fn aterm(out: &str, input_drvs: &[&str], input_srcs: &[&str]) -> String {
    let drvs: Vec<String> = input_drvs
        .iter()
        .map(|d| format!("(\"{d}\",[\"out\"])"))
        .collect();
    let srcs: Vec<String> = input_srcs.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "Derive([(\"out\",\"{out}\",\"\",\"\")],[{}],[{}],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"true\"],[(\"out\",\"{out}\")])",
        drvs.join(","),
        srcs.join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_cycle_or_a_path_outside_the_store_aborts_its_build_with_the_reason() {
    let mut d = Deployment::start().await;
    let nonce = d.env.nonce().to_string();
    let path = |hash: &str, name: &str| format!("/nix/store/{hash}-{name}-{nonce}");
    let (ha, hb, hc) = (
        "0123456789abcdfghijklmnpqrsvwxyz",
        "123456789abcdfghijklmnpqrsvwxyz0",
        "23456789abcdfghijklmnpqrsvwxyz01",
    );
    // a needs b, and b needs a.
    let a_drv = format!("{}.drv", path(ha, "cycle-a"));
    let b_drv = format!("{}.drv", path(hb, "cycle-b"));
    std::fs::write(&a_drv, aterm(&path(ha, "cycle-a"), &[&b_drv], &[])).unwrap();
    std::fs::write(&b_drv, aterm(&path(hb, "cycle-b"), &[&a_drv], &[])).unwrap();
    // An input source outside the store.
    let outside = format!("{}.drv", path(hc, "outside"));
    std::fs::write(&outside, aterm(&path(hc, "outside"), &[], &["/etc/passwd"])).unwrap();
    let _cleanup = [
        RemoveOnDrop(a_drv.clone().into()),
        RemoveOnDrop(b_drv.clone().into()),
        RemoveOnDrop(outside.clone().into()),
    ];

    let ids = queue(&d, &[build("cycle", &a_drv), build("outside", &outside)]).await;

    let statuses = d.wait_finished(&ids, 60).await;
    assert_eq!(statuses[&ids[0]], 3, "cycle");
    assert_eq!(statuses[&ids[1]], 3, "outside");
    for (id, words) in [
        (ids[0], ["dependency cycle", "cycle-"]),
        (ids[1], ["/etc/passwd", outside.as_str()]),
    ] {
        let (status, error): (Option<i32>, Option<String>) =
            sqlx::query_as("select status, errorMsg from BuildSteps where build = $1")
                .bind(id)
                .fetch_one(&d.pool)
                .await
                .unwrap();
        assert_eq!(status, Some(3));
        let error = error.unwrap_or_default();
        for word in words {
            assert!(error.contains(word), "{word:?} not in {error:?}");
        }
    }
    // The queue runner still serves: a good build goes through.
    d.add_agent("a1", 1).await;
    let good = d
        .submit_attrs(
            r#"{ x = mkDrv { PATH = "/usr/bin:/bin"; name = "after-bad"; args = [ "-c" "echo hi > $out" ]; }; }"#,
            &["x"],
        )
        .await;
    assert_eq!(d.wait_finished(&good, 60).await[&good[0]], 0);
    d.stop().await;
}
