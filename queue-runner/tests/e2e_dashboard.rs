//! The dashboard at `/` against a real queue runner and a real agent with
//! two slots: while a build runs it shows the queue by system and jobset,
//! the running step in its slot with its phase, the machine, a failed
//! step with a link to its log, and the throughput; names that came from
//! the database or the agent are escaped (a jobset and a machine named
//! with `<script>`), in the page as served and in the DOM headless
//! Chromium builds from it (a screenshot is saved as a test artifact).

#![allow(clippy::unwrap_used)]

#[path = "e2e/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::Deployment;
use sluice_builder_agent::topology::{Layout, Topology};

const MACHINE: &str = r#"builder-<script>alert("machine")</script>"#;
const JOBSET: &str = r#"<script>alert("jobset")</script>"#;

fn jobs(release: &Path) -> String {
    format!(
        r#"{{
  slow = mkDrv {{ PATH = "/usr/bin:/bin"; name = "dash-slow"; args = [ "-c" "echo started; while [ ! -e {release} ]; do sleep 0.2; done; echo done > $out" ]; }};
  fails = mkDrv {{ PATH = "/usr/bin:/bin"; name = "dash-fails"; args = [ "-c" "echo '<script>alert(\"log\")</script>'; exit 1" ]; }};
  elsewhere = mkDrv {{ system = "riscv64-none"; name = "dash-elsewhere"; args = [ "-c" "true" ]; }};
}}"#,
        release = release.display()
    )
}

/// A raw `GET`: the status code, the headers (lower-case names) and the
/// body.
async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (code, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Polls `/` until every needle is in the page; returns it. Panics with
/// the page and the missing needles after a minute.
async fn wait_page(d: &Deployment, needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _, page) = get(d.bound.http, "/").await;
        let missing: Vec<&&str> = needles.iter().filter(|n| !page.contains(**n)).collect();
        if code == 200 && missing.is_empty() {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dashboard never showed {missing:?}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where test artifacts go: `$SLUICE_TEST_ARTIFACTS`, else
/// `target/tmp/test-artifacts`.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("SLUICE_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Debian's Chromium, headless, on `url` with `args`; its stdout.
fn chromium(url: &str, args: &[&str]) -> String {
    let binary = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or_else(|| {
            panic!("headless Chromium is needed: apt-get install chromium (scripts/install-deps.sh does)")
        });
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_queue_running_steps_machines_and_failures_escaped() {
    let mut d = Deployment::start().await;
    let topology = Topology::read(Path::new("/sys")).unwrap();
    let layout = Layout::explicit(&topology, 2, 1).unwrap();
    let url = format!("http://{}", d.bound.grpc);
    d.add_agent_with(MACHINE, 2, url, |config, _| config.slots = Some(layout))
        .await;

    let release = tempfile::tempdir().unwrap();
    let release_file = release.path().join("release");
    let drvs = d
        .env
        .instantiate(&jobs(&release_file), &["slow", "fails", "elsewhere"]);
    let jobs: Vec<sluice_queue_runner::submit::Job> = ["slow", "fails", "elsewhere"]
        .iter()
        .zip(&drvs)
        .map(|(name, drv)| sluice_queue_runner::submit::Job {
            name: name.to_string(),
            drv_path: drv.clone(),
        })
        .collect();
    let ids = sluice_queue_runner::submit::queue(&d.pool, "e2e", JOBSET, &jobs)
        .await
        .unwrap();
    let failed = d.wait_finished(&ids[1..2], 120).await;
    assert_eq!(failed[&ids[1]], 1, "the failing build failed");
    let machine = d.wait_building(ids[0]).await;
    assert_eq!(machine, MACHINE);

    let slow = drvs[0].rsplit('/').next().unwrap();
    let slow_name = slow.split_once('-').unwrap().1;
    let fails = drvs[1].rsplit('/').next().unwrap();
    let fails_name = fails.split_once('-').unwrap().1;
    let machine_html = r#"builder-&lt;script&gt;alert(&quot;machine&quot;)&lt;/script&gt;"#;
    let jobset_html = r#"e2e:&lt;script&gt;alert(&quot;jobset&quot;)&lt;/script&gt;"#;
    let log_link = format!("<a href=\"/log/{fails}\">log</a>");
    let page = wait_page(
        &d,
        &[
            // The queue: both systems, and the jobset.
            "riscv64-none",
            &format!("{jobset_html}</td><td class=\"n\">2</td>"),
            // The running step, in its slot, building, with its job.
            slow_name,
            "building",
            "(node ",
            &format!("{jobset_html}:slow"),
            // The machine, its slots' state, its load.
            machine_html,
            "1 of 2 jobs",
            "idle",
            // The failure, with its log.
            fails_name,
            &log_link,
            // Throughput: the failed step.
            "failed: 1;",
        ],
    )
    .await;
    // The running step is in a pinned slot, not in the list of steps
    // outside one.
    let row = page
        .lines()
        .find(|l| l.contains(slow_name))
        .unwrap_or_else(|| panic!("no row for {slow_name}:\n{page}"));
    assert!(
        row.starts_with("<tr><td>") && row.contains("(node "),
        "{row}"
    );
    // Nothing from the database or the agent became markup.
    assert!(
        !page.to_ascii_lowercase().contains("<script"),
        "unescaped:\n{page}"
    );
    assert!(!page.contains(MACHINE) && !page.contains(JOBSET));

    let (code, headers, _) = get(d.bound.http, "/").await;
    assert_eq!(code, 200);
    let csp = header(&headers, "content-security-policy").unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");

    // The log link serves the log as plain text, never as a page.
    let (code, headers, log) = get(d.bound.http, &format!("/log/{fails}")).await;
    assert_eq!(code, 200);
    assert!(log.contains(r#"<script>alert("log")</script>"#), "{log}");
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
    for bad in [
        "/log/..%2F..%2Fetc%2Fpasswd",
        "/log/..",
        "/log/nothing-here.drv",
    ] {
        let (code, _, _) = get(d.bound.http, bad).await;
        assert_eq!(code, 404, "{bad}");
    }

    // A browser sees the same: the names as text, no script element.
    let url = format!("http://{}/", d.bound.http);
    let dom = chromium(&url, &["--dump-dom"]);
    // (A serialised DOM escapes `<` and `&` in text, not quotes.)
    let machine_dom = "builder-&lt;script&gt;alert(";
    for needle in [
        slow_name,
        machine_dom,
        fails_name,
        "riscv64-none",
        "building",
    ] {
        assert!(dom.contains(needle), "{needle} not in the DOM:\n{dom}");
    }
    assert!(
        !dom.to_ascii_lowercase().contains("<script"),
        "a script element:\n{dom}"
    );
    let screenshot = artifacts().join("dashboard.png");
    chromium(
        &url,
        &[
            "--window-size=1400,1800",
            &format!("--screenshot={}", screenshot.display()),
        ],
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{png:?}");
    eprintln!("dashboard screenshot: {}", screenshot.display());

    // The step finishes: its slot is idle again, and it is counted.
    std::fs::write(&release_file, "").unwrap();
    let done = d.wait_finished(&ids[..1], 120).await;
    assert_eq!(done[&ids[0]], 0);
    wait_page(&d, &["Steps succeeded: 1,", "0 of 2 jobs"]).await;
    // The list of running steps is published at most every
    // `RUNNING_REFRESH` (250 ms), so it may trail the counters by that
    // much: within a few seconds it no longer lists the step.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, page) = get(d.bound.http, "/").await;
        if !page.contains(slow_name) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finished step is still listed as running:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.stop().await;
}
