//! `SluiceBuildTimes`: how long derivations of each name take to build,
//! for critical-path scheduling.
//!
//! Invariants: a time is recorded in the transaction that finishes its
//! step; every read is a point query on the primary key, one round trip
//! for any number of names.

use std::collections::HashMap;

use sqlx::PgConnection;

use super::{db_err, ResultsError};

/// The name a derivation's build time is kept under: its name without
/// the store dir, hash and `.drv`, cut before the first `-` that a digit
/// follows (its version): `/nix/store/…-hello-2.12.1.drv` → `hello`.
pub fn build_time_name(drv_path: &str) -> &str {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    let name = base.split_once('-').map_or(base, |(_, name)| name);
    let bytes = name.as_bytes();
    let cut = (0..bytes.len())
        .find(|&i| bytes[i] == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit))
        .unwrap_or(bytes.len());
    // `cut` is at an ASCII byte or the end: a character boundary.
    name.get(..cut).unwrap_or(name)
}

/// Records that a derivation named `name` built in `ms` milliseconds.
pub async fn record_build_time(
    conn: &mut PgConnection,
    name: &str,
    ms: u64,
) -> Result<(), ResultsError> {
    record_build_times(conn, &[(name, ms)]).await
}

/// Records build times `(name, ms)`, in the order given: each sample moves
/// its name's average a quarter of the way towards it. One statement per
/// round, where a round takes each name once (a name given three times
/// takes three rounds), so the result is as if they came one by one.
pub async fn record_build_times(
    conn: &mut PgConnection,
    samples: &[(&str, u64)],
) -> Result<(), ResultsError> {
    let mut rest: Vec<(&str, i64)> = samples
        .iter()
        .map(|(name, ms)| (*name, i64::try_from(*ms).unwrap_or(i64::MAX)))
        .collect();
    while !rest.is_empty() {
        let mut seen = std::collections::HashSet::new();
        let (round, later): (Vec<_>, Vec<_>) =
            rest.into_iter().partition(|(name, _)| seen.insert(*name));
        rest = later;
        sqlx::query(
            "insert into SluiceBuildTimes (name, avgMs, samples)
             select u.name, u.ms, 1 from unnest($1::text[], $2::int8[]) as u(name, ms)
             on conflict (name) do update
             set avgMs = (SluiceBuildTimes.avgMs * 3 + excluded.avgMs) / 4,
                 samples = SluiceBuildTimes.samples + 1",
        )
        .bind(round.iter().map(|r| r.0).collect::<Vec<&str>>())
        .bind(round.iter().map(|r| r.1).collect::<Vec<i64>>())
        .execute(&mut *conn)
        .await
        .map_err(db_err("recording build times"))?;
    }
    Ok(())
}

/// The expected build times of `names` (milliseconds), for those known;
/// one query per [`super::LOOKUP_CHUNK`] names.
pub async fn lookup_build_times(
    conn: &mut PgConnection,
    names: &[&str],
) -> Result<HashMap<String, u64>, ResultsError> {
    let mut times = HashMap::new();
    for chunk in names.chunks(super::LOOKUP_CHUNK) {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select name, avgMs from SluiceBuildTimes where name = any($1)")
                .bind(chunk)
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err("reading build times"))?;
        times.extend(
            rows.into_iter()
                .map(|(name, ms)| (name, u64::try_from(ms).unwrap_or(0))),
        );
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::build_time_name;

    #[test]
    fn a_build_time_is_kept_under_the_name_without_its_version() {
        let name = |p| build_time_name(p);
        assert_eq!(
            name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.1.drv"),
            "hello"
        );
        assert_eq!(
            name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-python3.11-requests-2.31.0.drv"),
            "python3.11-requests"
        );
        assert_eq!(
            name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-stdenv-linux.drv"),
            "stdenv-linux"
        );
        assert_eq!(name("odd"), "odd");
    }
}
