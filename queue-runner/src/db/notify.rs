//! The notifications the queue runner sends, which Hydra's notifier and web
//! UI listen to: `build_started`, `step_started`, `step_finished` and
//! `build_finished`, with tab-separated payloads.
//!
//! Invariants: every payload is shorter than 8000 bytes, PostgreSQL's
//! limit; a `build_finished` with many dependents is split into several
//! notifications, each starting with the head build's id, which together
//! list every dependent once and in the order given. Notifications sent on
//! a connection inside a transaction are delivered when it commits (and
//! PostgreSQL drops exact duplicates within one transaction), so callers
//! send them in the transaction whose writes they announce.

use std::fmt::Write as _;
use std::path::Path;

use sqlx::PgConnection;

/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
pub const MAX_PAYLOAD_BYTES: usize = 7999;

/// Why a notification was not sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notifying {channel} for build {build}: {}", super::describe_sqlx_error(.source))]
    Database {
        channel: &'static str,
        build: i32,
        #[source]
        source: sqlx::Error,
    },
    #[error("notifying step_finished for step {stepnr} of build {build}: log path {path:?} is not UTF-8 without tabs or newlines")]
    BadLogPath {
        build: i32,
        stepnr: i32,
        path: String,
    },
}

fn db_err(channel: &'static str, build: i32) -> impl FnOnce(sqlx::Error) -> NotifyError {
    move |source| NotifyError::Database {
        channel,
        build,
        source,
    }
}

/// One notification, made before it is sent, so that a batch of writes
/// can send all of theirs in one statement ([`send`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub channel: &'static str,
    /// The build it is about (for errors).
    pub build: i32,
    pub payload: String,
}

impl Notification {
    /// `build_started`: `buildId`.
    pub fn build_started(build: i32) -> Notification {
        Notification {
            channel: "build_started",
            build,
            payload: build.to_string(),
        }
    }

    /// `step_started`: `buildId\tstepnr`.
    pub fn step_started(build: i32, stepnr: i32) -> Notification {
        Notification {
            channel: "step_started",
            build,
            payload: format!("{build}\t{stepnr}"),
        }
    }

    /// `step_finished`: `buildId\tstepnr\tlogPath` (`-` when there is no
    /// log).
    pub fn step_finished(
        build: i32,
        stepnr: i32,
        log_path: Option<&Path>,
    ) -> Result<Notification, NotifyError> {
        Ok(Notification {
            channel: "step_finished",
            build,
            payload: step_finished_payload(build, stepnr, log_path)?,
        })
    }

    /// `build_finished`, in as many notifications as needed (see
    /// [`build_finished_payloads`]).
    pub fn build_finished(head: i32, dependents: &[i32]) -> Vec<Notification> {
        build_finished_payloads(head, dependents)
            .into_iter()
            .map(|payload| Notification {
                channel: "build_finished",
                build: head,
                payload,
            })
            .collect()
    }
}

/// Sends `notifications`, in order, in one statement.
pub async fn send(
    conn: &mut PgConnection,
    notifications: &[Notification],
) -> Result<(), NotifyError> {
    let Some(first) = notifications.first() else {
        return Ok(());
    };
    sqlx::query("select pg_notify(u.channel, u.payload) from unnest($1::text[], $2::text[]) as u(channel, payload)")
        .bind(notifications.iter().map(|n| n.channel).collect::<Vec<&str>>())
        .bind(notifications.iter().map(|n| n.payload.as_str()).collect::<Vec<&str>>())
        .execute(&mut *conn)
        .await
        .map_err(db_err(first.channel, first.build))?;
    Ok(())
}

/// `build_started`: `buildId`.
pub async fn build_started(conn: &mut PgConnection, build: i32) -> Result<(), NotifyError> {
    send(conn, &[Notification::build_started(build)]).await
}

/// `step_started`: `buildId\tstepnr`.
pub async fn step_started(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
) -> Result<(), NotifyError> {
    send(conn, &[Notification::step_started(build, stepnr)]).await
}

/// The `step_finished` payload: `buildId\tstepnr\tlogPath`, `-` for no log.
pub fn step_finished_payload(
    build: i32,
    stepnr: i32,
    log_path: Option<&Path>,
) -> Result<String, NotifyError> {
    let log = match log_path {
        None => "-",
        Some(path) => path
            .to_str()
            .filter(|p| !p.is_empty() && !p.contains(['\t', '\n', '\0']))
            .ok_or_else(|| NotifyError::BadLogPath {
                build,
                stepnr,
                path: path.to_string_lossy().into_owned(),
            })?,
    };
    Ok(format!("{build}\t{stepnr}\t{log}"))
}

/// `step_finished`: `buildId\tstepnr\tlogPath` (`-` when there is no log).
pub async fn step_finished(
    conn: &mut PgConnection,
    build: i32,
    stepnr: i32,
    log_path: Option<&Path>,
) -> Result<(), NotifyError> {
    send(
        conn,
        &[Notification::step_finished(build, stepnr, log_path)?],
    )
    .await
}

/// The `build_finished` payloads for `head` and the builds that finished
/// with it: `head[\tdependent…]`, split so that each stays within
/// [`MAX_PAYLOAD_BYTES`]. Always at least one payload.
pub fn build_finished_payloads(head: i32, dependents: &[i32]) -> Vec<String> {
    let head = head.to_string();
    let mut payloads = Vec::new();
    let mut payload = head.clone();
    let mut id = String::new();
    for dependent in dependents {
        id.clear();
        let _ = write!(id, "\t{dependent}");
        if payload.len() + id.len() > MAX_PAYLOAD_BYTES {
            payloads.push(std::mem::replace(&mut payload, head.clone()));
        }
        payload.push_str(&id);
    }
    payloads.push(payload);
    payloads
}

/// `build_finished`: `head[\tdependent…]`, in as many notifications as
/// needed (see [`build_finished_payloads`]).
pub async fn build_finished(
    conn: &mut PgConnection,
    head: i32,
    dependents: &[i32],
) -> Result<(), NotifyError> {
    send(conn, &Notification::build_finished(head, dependents)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_lists_fit_one_payload() {
        assert_eq!(build_finished_payloads(7, &[]), ["7"]);
        assert_eq!(build_finished_payloads(7, &[8, 9]), ["7\t8\t9"]);
    }

    fn check_split(head: i32, dependents: &[i32]) {
        let payloads = build_finished_payloads(head, dependents);
        let mut seen = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD_BYTES, "{}", payload.len());
            let mut fields = payload.split('\t');
            assert_eq!(fields.next(), Some(head.to_string().as_str()));
            for field in fields {
                seen.push(field.parse::<i32>().expect("an id"));
            }
        }
        assert_eq!(seen, dependents);
        // No payload could have taken the first id of the next one.
        for pair in payloads.windows(2) {
            if let [a, b] = pair {
                let next = b.split('\t').nth(1).expect("a dependent");
                assert!(a.len() + 1 + next.len() > MAX_PAYLOAD_BYTES);
            }
        }
    }

    #[test]
    fn long_lists_are_split_each_under_the_limit_with_the_head_first() {
        let many: Vec<i32> = (1_000_000..1_005_000).collect();
        check_split(i32::MAX, &many);
        check_split(-1, &many);
        let negatives: Vec<i32> = (0..3000).map(|i| i32::MIN + i).collect();
        check_split(42, &negatives);
        assert!(build_finished_payloads(42, &negatives).len() > 3);
    }

    #[test]
    fn a_payload_may_be_exactly_at_the_limit() {
        // "1234567" + 999 * "\t1234567" is 7 + 7992 = 7999 bytes, the most
        // PostgreSQL takes; a 1000th id goes to a second payload.
        let ids = vec![1_234_567; 1000];
        let payloads = build_finished_payloads(1_234_567, &ids);
        assert_eq!(payloads.len(), 2);
        assert_eq!(payloads.first().map(String::len), Some(MAX_PAYLOAD_BYTES));
        assert_eq!(
            payloads.get(1).map(String::as_str),
            Some("1234567\t1234567")
        );
    }

    #[test]
    fn step_finished_payloads() {
        assert_eq!(
            step_finished_payload(3, 2, None).expect("payload"),
            "3\t2\t-"
        );
        assert_eq!(
            step_finished_payload(3, 2, Some(Path::new("/d/build-logs/ab/c.drv")))
                .expect("payload"),
            "3\t2\t/d/build-logs/ab/c.drv"
        );
        assert!(step_finished_payload(3, 2, Some(Path::new("/a\tb"))).is_err());
    }
}
