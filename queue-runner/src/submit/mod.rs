//! `queue-runner submit`: queues builds the way an evaluator does.
//!
//! For each job it makes sure the project and jobset exist, inserts a
//! `Builds` row and its `BuildOutputs`, records one `JobsetEvals` row for
//! the whole submission, and sends `builds_added`. With `wait`, it then
//! follows the builds until they are all finished, and explains each
//! failure ([`report`]): the step that failed, its error, and the end of
//! its log.

pub(crate) mod report;

use report::printable;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use sluice_nix::derivation::Derivation;
use sluice_nix::store_path::StoreDir;
use sqlx::PgPool;

use crate::db::evaluator::{self, NewBuild};
pub use crate::db::evaluator::{BuildState, FailedStep};
pub use report::{
    exit_code, failure_report, format_failure, read_log_tail, StepLog, LOG_TAIL_LINES,
};

/// One job to queue: a name and a `.drv` path (already instantiated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub drv_path: String,
}

/// What a target on the command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Drv(String),
    Expr { file: String, attr: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("instantiating {file} -A {attr}: {cause}")]
    Instantiate {
        file: String,
        attr: String,
        cause: String,
    },
    #[error("reading derivation {path}: {cause}")]
    Derivation { path: String, cause: String },
    #[error("queueing builds: {0}")]
    Db(String),
    #[error("following builds: {0}")]
    Follow(String),
    #[error("printing the state of the builds: {0}")]
    Print(#[source] std::io::Error),
}

/// Parses `--job NAME (DRV | FILE.nix -A ATTR)...` sequences.
pub fn parse_jobs(args: &[String]) -> Result<Vec<(String, Vec<Target>)>, SubmitError> {
    let mut jobs: Vec<(String, Vec<Target>)> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--job" {
            let name = args
                .get(i + 1)
                .ok_or_else(|| SubmitError::Usage("--job needs a NAME".into()))?;
            jobs.push((name.clone(), Vec::new()));
            i += 2;
            continue;
        }
        let Some((_, targets)) = jobs.last_mut() else {
            return Err(SubmitError::Usage(format!(
                "{arg}: every target must follow a --job NAME"
            )));
        };
        if arg.ends_with(".drv") {
            targets.push(Target::Drv(arg.clone()));
            i += 1;
        } else if arg.ends_with(".nix") {
            match (args.get(i + 1).map(String::as_str), args.get(i + 2)) {
                (Some("-A"), Some(attr)) => {
                    targets.push(Target::Expr {
                        file: arg.clone(),
                        attr: attr.clone(),
                    });
                    i += 3;
                }
                _ => {
                    return Err(SubmitError::Usage(format!(
                        "{arg} must be followed by -A ATTR"
                    )))
                }
            }
        } else {
            return Err(SubmitError::Usage(format!(
                "{arg}: expected a .drv path or FILE.nix -A ATTR"
            )));
        }
    }
    if jobs.is_empty() {
        return Err(SubmitError::Usage("no --job given".into()));
    }
    if let Some((name, _)) = jobs.iter().find(|(_, t)| t.is_empty()) {
        return Err(SubmitError::Usage(format!("--job {name} has no target")));
    }
    Ok(jobs)
}

/// Turns targets into `.drv` paths, running `nix-instantiate` for
/// expressions. A job with several targets becomes `name`, `name-2`, ….
pub fn resolve_jobs(jobs: Vec<(String, Vec<Target>)>) -> Result<Vec<Job>, SubmitError> {
    let mut out = Vec::new();
    for (name, targets) in jobs {
        for (n, target) in targets.into_iter().enumerate() {
            let job_name = if n == 0 {
                name.clone()
            } else {
                format!("{name}-{}", n + 1)
            };
            let drv_path = match target {
                Target::Drv(p) => p,
                Target::Expr { file, attr } => instantiate(&file, &attr)?,
            };
            out.push(Job {
                name: job_name,
                drv_path,
            });
        }
    }
    Ok(out)
}

fn instantiate(file: &str, attr: &str) -> Result<String, SubmitError> {
    let err = |cause: String| SubmitError::Instantiate {
        file: file.into(),
        attr: attr.into(),
        cause,
    };
    let out = std::process::Command::new("nix-instantiate")
        .args([file, "-A", attr])
        .output()
        .map_err(|e| err(format!("cannot run nix-instantiate: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(err(stderr
            .trim()
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".drv"))
        .map(str::to_string)
        .ok_or_else(|| err("printed no .drv path".into()))
}

fn db(e: sqlx::Error) -> SubmitError {
    SubmitError::Db(crate::db::describe_sqlx_error(&e))
}

/// Inserts the builds; returns their ids in job order.
pub async fn queue(
    pool: &PgPool,
    project: &str,
    jobset: &str,
    jobs: &[Job],
) -> Result<Vec<i32>, SubmitError> {
    let dir = StoreDir::default();
    let mut parsed = Vec::new();
    for job in jobs {
        let derr = |cause: String| SubmitError::Derivation {
            path: job.drv_path.clone(),
            cause,
        };
        let sp = dir
            .parse_path(&job.drv_path)
            .map_err(|e| derr(e.to_string()))?;
        let text = std::fs::read(&job.drv_path).map_err(|e| derr(e.to_string()))?;
        let drv = Derivation::parse_drv_file(&dir, &sp, &text).map_err(|e| derr(e.to_string()))?;
        let mut outputs = BTreeMap::new();
        for (name, out) in &drv.outputs {
            let path = out
                .path(&dir, &drv.name, name)
                .map_err(|e| derr(e.to_string()))?
                .map(|p| dir.print(&p));
            outputs.insert(name.clone(), path);
        }
        parsed.push((job, drv, outputs));
    }
    let builds: Vec<NewBuild> = parsed
        .into_iter()
        .map(|(job, drv, outputs)| NewBuild {
            job: job.name.clone(),
            nix_name: drv.name,
            drv_path: job.drv_path.clone(),
            system: drv.platform,
            outputs: outputs.into_iter().collect(),
            max_silent_s: NewBuild::DEFAULT_LIMITS.0,
            timeout_s: NewBuild::DEFAULT_LIMITS.1,
        })
        .collect();
    evaluator::queue_builds(pool, project, jobset, &builds, super::driver::unix_now())
        .await
        .map_err(db)
}

/// Hydra's name for a build or step status code.
pub fn status_name(code: i32) -> &'static str {
    match code {
        0 => "succeeded",
        1 => "failed",
        2 => "dependency failed",
        3 => "aborted",
        4 => "cancelled",
        6 => "failed with output",
        7 => "timed out",
        8 => "cached failure",
        9 => "unsupported system/features",
        10 => "log limit exceeded",
        11 => "output limit exceeded",
        12 => "not deterministic",
        13 => "resolved",
        _ => "unknown status",
    }
}

/// Follows `ids` until all are finished, printing each as it finishes on
/// standard output, with a [`failure_report`] for each that did not
/// succeed (logs are looked for under `data_dir`). Returns whether all
/// succeeded.
pub async fn wait(
    pool: &PgPool,
    ids: &[i32],
    poll: Duration,
    data_dir: &Path,
) -> Result<bool, SubmitError> {
    follow(pool, ids, poll, data_dir, &mut std::io::stdout()).await
}

/// [`wait`], printing to `out`.
pub async fn follow<W: Write + Send>(
    pool: &PgPool,
    ids: &[i32],
    poll: Duration,
    data_dir: &Path,
    out: &mut W,
) -> Result<bool, SubmitError> {
    let mut reported = std::collections::HashSet::new();
    loop {
        let states = evaluator::build_states(pool, ids).await.map_err(|e| {
            SubmitError::Follow(format!(
                "reading the state of the builds: {}",
                crate::db::describe_sqlx_error(&e)
            ))
        })?;
        for s in &states {
            if !s.finished || !reported.insert(s.id) {
                continue;
            }
            let text = if s.status == Some(0) {
                format!(
                    "build {} ({}): {}\n",
                    s.id,
                    printable(&s.job),
                    status_name(0)
                )
            } else {
                failure_report(pool, s, data_dir).await?
            };
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(SubmitError::Print)?;
        }
        let done = states.iter().filter(|s| s.finished).count();
        if done == ids.len() {
            return Ok(states.iter().all(|s| s.status == Some(0)));
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_jobs_and_targets() {
        let jobs = parse_jobs(&args(
            "--job a /nix/store/x-a.drv --job b f.nix -A b g.nix -A c",
        ))
        .expect("valid");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].1, vec![Target::Drv("/nix/store/x-a.drv".into())]);
        assert_eq!(jobs[1].1.len(), 2);
    }

    #[test]
    fn rejects_bad_sequences() {
        assert!(parse_jobs(&args("x.drv")).is_err());
        assert!(parse_jobs(&args("--job a")).is_err());
        assert!(parse_jobs(&args("--job a f.nix")).is_err());
        assert!(parse_jobs(&args("--job a something")).is_err());
        assert!(parse_jobs(&[]).is_err());
    }
}
