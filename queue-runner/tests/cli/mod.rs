//! The binaries as an operator runs them: processes started from the
//! built executables, their stderr collected line by line, signals sent,
//! and the processes of the embedded PostgreSQL found in `/proc`.

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_test_support::wait_until;

pub const QUEUE_RUNNER: &str = env!("CARGO_BIN_EXE_queue-runner");

/// The builder agent's executable, built beside ours by `cargo test
/// --workspace` and by `scripts/test.sh` (which builds every binary first).
pub fn builder_agent() -> PathBuf {
    let path = Path::new(QUEUE_RUNNER).with_file_name("builder-agent");
    assert!(
        path.is_file(),
        "{} is missing: build it first (`cargo build -p sluice-builder-agent`; scripts/test.sh does)",
        path.display()
    );
    path
}

/// The directory holding both executables.
pub fn bin_dir() -> PathBuf {
    builder_agent();
    Path::new(QUEUE_RUNNER).parent().unwrap().to_path_buf()
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A running process whose stdout and stderr lines are collected.
pub struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proc {
            child,
            lines,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until a printed line contains `text`.
    pub fn wait_for(&self, text: &str, within: Duration) -> bool {
        wait_until(within, || {
            self.lines.lock().unwrap().iter().any(|l| l.contains(text))
        })
    }

    /// Waits until a printed line contains `text`, or panics with the output.
    pub fn expect_line(&self, text: &str, within: Duration) {
        assert!(
            self.wait_for(text, within),
            "no line with {text:?} within {within:?}; output:\n{}",
            self.output()
        );
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit; `None` if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            wait_until(within, || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    self.status = Some(status);
                }
                self.status.is_some()
            });
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Pids of the postmasters running on the embedded cluster of `data_dir`
/// (`<data_dir>/postgres`): the processes whose command line has
/// `-D <data_dir>/postgres`. Backends rename themselves and do not match.
pub fn postmasters_of(data_dir: &Path) -> Vec<i32> {
    let cluster = data_dir.join("postgres");
    let needle = format!("-D\0{}\0", cluster.display());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let alive = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
            })
            .is_some_and(|state| state != "Z");
        if alive && String::from_utf8_lossy(&cmdline).contains(&needle) {
            let ppid = std::fs::read_to_string(entry.path().join("status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<i32>().ok())
                })
                .unwrap_or(0);
            pids.push((pid, ppid));
        }
    }
    // A backend just forked shows its postmaster's command line until it
    // sets its own: only processes whose parent is not one count.
    let all: Vec<i32> = pids.iter().map(|(pid, _)| *pid).collect();
    pids.into_iter()
        .filter(|(_, ppid)| !all.contains(ppid))
        .map(|(pid, _)| pid)
        .collect()
}

/// Stops whatever postmaster still runs on `data_dir`'s cluster, so a
/// failing test leaves nothing behind.
pub struct StopLeftovers(pub PathBuf);

impl Drop for StopLeftovers {
    fn drop(&mut self) {
        for pid in postmasters_of(&self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `queue-runner serve` on the embedded database of a fresh data
/// directory, with an agent token file and a gRPC port of its own, up.
/// Dropped, it stops the queue runner, then its PostgreSQL, then removes
/// the directory (the fields drop in that order).
pub struct Serving {
    pub runner: Proc,
    _leftovers: StopLeftovers,
    pub tokens: PathBuf,
    pub port: u16,
    /// Every argument after the data directory and token file.
    args: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Serving {
    /// Starts it with agent token `token` and more `args`; returns once it
    /// is up.
    pub fn start(token: &str, args: &[&str]) -> Serving {
        Serving::start_with_env(token, args, &[])
    }

    /// [`Serving::start`] with failpoint `name` armed: see
    /// [`Serving::expect_failpoint_stop`].
    pub fn start_with_failpoint(token: &str, args: &[&str], name: &str) -> Serving {
        Serving::start_with_env(token, args, &[("SLUICE_FAILPOINTS", name)])
    }

    fn start_with_env(token: &str, args: &[&str], env: &[(&str, &str)]) -> Serving {
        let dir = data_dir();
        let leftovers = StopLeftovers(dir.path().to_path_buf());
        let tokens = token_file(dir.path(), token);
        let port = free_port();
        let mut all = vec!["--grpc-listen".to_owned(), format!("127.0.0.1:{port}")];
        all.extend(args.iter().map(|a| a.to_string()));
        let runner = serve_with_env(dir.path(), &tokens, &strs(&all), env);
        runner.expect_line("queue runner up", Duration::from_secs(120));
        Serving {
            runner,
            _leftovers: leftovers,
            tokens,
            port,
            args: all,
            dir,
        }
    }

    /// Waits up to 120 s for failpoint `name` to stop the queue runner
    /// dead, and checks it did.
    pub fn expect_failpoint_stop(&mut self, name: &str) {
        let status = self.runner.wait_exit(Duration::from_secs(120));
        assert!(
            status.is_some_and(|s| !s.success()),
            "the failpoint stopped it: {status:?}\n{}",
            self.runner.output()
        );
        assert!(self.runner.output().contains(&format!("failpoint {name}")));
    }

    /// Starts the queue runner again, with no failpoint, on the same data
    /// directory, token file, port and arguments; returns once it is up.
    pub fn serve_again(&mut self) {
        self.runner = serve_with(self.dir.path(), &self.tokens, &strs(&self.args));
        self.runner
            .expect_line("queue runner up", Duration::from_secs(120));
    }

    /// An [`agent_proc`] dialling it, once the queue runner has seen it.
    pub fn agent(&self, name: &str, max_jobs: u32, extra: &[&OsStr]) -> Proc {
        let agent = agent_proc(self.port, &self.tokens, name, max_jobs, extra);
        self.runner
            .expect_line(&format!("agent={name}"), Duration::from_secs(30));
        agent
    }

    /// Where it serves HTTP.
    pub fn http(&self) -> std::net::SocketAddr {
        bound_address(&self.runner, "http_addr").parse().unwrap()
    }

    /// Stops it with SIGTERM and checks that it exits 0.
    pub fn stop(mut self) {
        self.runner.signal(Signal::SIGTERM);
        let status = self.runner.wait_exit(Duration::from_secs(60));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{}",
            self.runner.output()
        );
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Waits up to 60 s for the first `BuildSteps` row.
pub async fn wait_first_step_row(pool: &sqlx::PgPool, runner: &Proc) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while count(pool, "select count(*) from BuildSteps").await == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", runner.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A data directory for an embedded database, traversable by the
/// unprivileged user PostgreSQL runs as.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-cli-")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A token file with one bare token; returns its path.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("agent-tokens");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

/// `queue-runner serve` on the embedded database under `data_dir`, on
/// ports the kernel picks.
pub fn serve(data_dir: &Path, token_file: &Path) -> Proc {
    serve_with(data_dir, token_file, &["--grpc-listen", "127.0.0.1:0"])
}

/// [`serve`] with more arguments (`--grpc-listen` among them: it has no
/// default here); the HTTP port is the kernel's pick.
pub fn serve_with(data_dir: &Path, token_file: &Path, args: &[&str]) -> Proc {
    serve_with_env(data_dir, token_file, args, &[])
}

/// [`serve_with`], with environment variables set.
pub fn serve_with_env(
    data_dir: &Path,
    token_file: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    Proc::spawn(
        Command::new(QUEUE_RUNNER)
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--agent-token-file")
            .arg(token_file)
            .args(["--http-listen", "127.0.0.1:0"])
            .args(args)
            .env("NIX_CONFIG", sluice_test_support::nix::NIX_CONFIG)
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG"),
    )
}

/// The address a running `serve` printed for `what` ("grpc_addr" or
/// "http_addr") in its "queue runner up" line.
pub fn bound_address(serve: &Proc, what: &str) -> String {
    let output = serve.output();
    let line = output
        .lines()
        .find(|l| l.contains("queue runner up"))
        .unwrap_or_else(|| panic!("no 'queue runner up' line in:\n{output}"));
    let start = line.find(&format!("{what}=")).unwrap() + what.len() + 1;
    line[start..].split_whitespace().next().unwrap().to_string()
}

/// The rows Hydra's web UI reads after a run through crashes: every build
/// succeeded, no step row is busy, and no derivation has two successful
/// rows. `log` is printed with a failure.
pub async fn assert_settled(pool: &sqlx::PgPool, log: &str) {
    let listed = |sql: &'static str| async move {
        sqlx::query_scalar::<_, String>(sql)
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let failed = listed(
        "select format('build %s: status %s; step %s: status %s, %s, %s',
                      b.id, b.buildStatus, s.stepnr, s.status, s.errorMsg, s.drvPath)
         from Builds b left join BuildSteps s on s.build = b.id
         where b.buildStatus <> 0 order by b.id, s.stepnr",
    )
    .await;
    assert!(failed.is_empty(), "failed builds: {failed:#?}\n{log}");
    let busy = listed(
        "select format('build %s step %s %s: busy %s on %s since %s', build, stepnr, drvPath,
                      busy, machine, startTime)
         from BuildSteps where busy <> 0 or status is null",
    )
    .await;
    assert!(busy.is_empty(), "rows left busy: {busy:#?}\n{log}");
    let twice = listed(
        "select drvPath from BuildSteps where status = 0 group by drvPath having count(*) > 1",
    )
    .await;
    assert!(
        twice.is_empty(),
        "derivations with two successful rows: {twice:#?}"
    );
}

/// A free local TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `builder-agent` named `name` with `max_jobs` slots, dialling the queue
/// runner on local `port`, reconnecting within half a second; `extra`
/// arguments are appended.
pub fn agent_proc(port: u16, tokens: &Path, name: &str, max_jobs: u32, extra: &[&OsStr]) -> Proc {
    Proc::spawn(
        Command::new(builder_agent())
            .args(["--queue-runner", &format!("http://127.0.0.1:{port}")])
            .arg("--token-file")
            .arg(tokens)
            .args(["--name", name, "--max-jobs", &max_jobs.to_string()])
            .args(["--reconnect-max-ms", "500"])
            .args(extra)
            .env("NIX_CONFIG", sluice_test_support::nix::NIX_CONFIG)
            .env_remove("RUST_LOG"),
    )
}

/// `queue-runner submit` of `jobs` (attribute names, used as job names)
/// of the expression file `expr`, on the embedded database of `data_dir`.
pub fn submit_jobs(data_dir: &Path, expr: &Path, jobs: &[&str]) {
    let mut submit = Command::new(QUEUE_RUNNER);
    submit.arg("submit").arg("--data-dir").arg(data_dir);
    for job in jobs {
        submit.args(["--job", job]).arg(expr).args(["-A", job]);
    }
    let out = submit
        .env("NIX_CONFIG", sluice_test_support::nix::NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small pool on the embedded PostgreSQL a queue runner runs under
/// `data_dir`.
pub async fn embedded_pool(data_dir: &Path) -> sqlx::PgPool {
    let url = sluice_queue_runner::embedded::url_if_running(data_dir).unwrap();
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap()
}

/// The single number `sql` selects.
pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits up to two minutes until every build finished; `runner`'s output
/// is shown if they do not.
pub async fn wait_all_finished(pool: &sqlx::PgPool, runner: &Proc) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let unfinished = count(pool, "select count(*) from Builds where finished = 0").await;
        if unfinished == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unfinished} builds never finished:\n{}",
            runner.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
