//! Schema migrations: Hydra's schema (when the database is ours) and
//! Sluice's own tables.
//!
//! Two ordered sets live under `sql/`:
//! - `sql/hydra/`: Hydra's schema at the version we speak, written for
//!   databases Sluice creates. Skipped entirely when the database was
//!   created by Hydra: such a database has a `SchemaVersion` table but no
//!   record of ours saying we created it, and Hydra's own `hydra-init` owns
//!   its tables.
//! - `sql/sluice/`: tables of our own, always named `Sluice*`; never a
//!   change to one of Hydra's tables.
//!
//! Invariants: applying is idempotent (each migration is recorded in
//! `SluiceSchemaMigrations` with a checksum, in the same transaction that
//! applies it); concurrent `migrate` runs serialise on an advisory lock; a
//! recorded migration whose file has since changed is an error, not a
//! silent skip.

use sha2::{Digest, Sha256};
use sqlx::{Connection, PgConnection, Row};

/// One migration file, embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// `hydra` or `sluice`.
    pub set: &'static str,
    /// The file name without `.sql`; orders the set.
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    fn id(&self) -> String {
        format!("{}/{}", self.set, self.name)
    }

    fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// The oldest Hydra schema version whose columns we write (resolvedDrvPath
/// arrived in 87).
pub const MIN_HYDRA_SCHEMA_VERSION: i32 = 87;

/// Hydra's schema, as Sluice creates it.
pub const HYDRA_MIGRATIONS: &[Migration] = &[Migration {
    set: "hydra",
    name: "0001_hydra_schema_v87",
    sql: include_str!("../../../sql/hydra/0001_hydra_schema_v87.sql"),
}];

/// Sluice's own tables.
pub const SLUICE_MIGRATIONS: &[Migration] = &[
    Migration {
        set: "sluice",
        name: "0001_attempts",
        sql: include_str!("../../../sql/sluice/0001_attempts.sql"),
    },
    Migration {
        set: "sluice",
        name: "0002_step_runs",
        sql: include_str!("../../../sql/sluice/0002_step_runs.sql"),
    },
    Migration {
        set: "sluice",
        name: "0003_realisations",
        sql: include_str!("../../../sql/sluice/0003_realisations.sql"),
    },
    Migration {
        set: "sluice",
        name: "0004_build_times",
        sql: include_str!("../../../sql/sluice/0004_build_times.sql"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {id} failed: {cause}")]
    Apply { id: String, cause: String },
    #[error(
        "migration {id} was applied with checksum {recorded} but the file now has {current}; \
         applied migrations must never be edited"
    )]
    Edited {
        id: String,
        recorded: String,
        current: String,
    },
    #[error(
        "the database was created by Hydra at schema version {found}, older than {needed}; \
         run Hydra's `hydra-init` to upgrade it first"
    )]
    HydraTooOld { found: i32, needed: i32 },
    #[error("reading migration state: {0}")]
    State(String),
}

/// Who owns the Hydra tables of a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HydraSchema {
    /// Created (now or earlier) by Sluice's own migrations.
    Ours,
    /// Created by Hydra; left alone. Holds `SchemaVersion.version`.
    Hydra { version: i32 },
}

/// What a `migrate` run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub hydra_schema: HydraSchema,
    /// Ids (`set/name`) applied by this run, in order.
    pub applied: Vec<String>,
}

/// The advisory lock all `migrate` runs take; any constant unique to Sluice.
const LOCK_KEY: i64 = 0x5_1c_e0_01;

fn state_err(e: sqlx::Error) -> MigrateError {
    MigrateError::State(super::describe_sqlx_error(&e))
}

/// Applies every pending migration in one transaction.
pub async fn migrate(conn: &mut PgConnection) -> Result<MigrateReport, MigrateError> {
    migrate_sets(conn, HYDRA_MIGRATIONS, SLUICE_MIGRATIONS).await
}

/// [`migrate`] with explicit sets, for tests.
pub async fn migrate_sets(
    conn: &mut PgConnection,
    hydra: &'static [Migration],
    sluice: &'static [Migration],
) -> Result<MigrateReport, MigrateError> {
    let mut tx = conn.begin().await.map_err(state_err)?;
    sqlx::query("select pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await
        .map_err(state_err)?;
    sqlx::query(
        "create table if not exists SluiceSchemaMigrations (
             id         text primary key,
             checksum   text not null,
             appliedAt  timestamptz not null default now()
         )",
    )
    .execute(&mut *tx)
    .await
    .map_err(state_err)?;

    let recorded: Vec<(String, String)> =
        sqlx::query("select id, checksum from SluiceSchemaMigrations")
            .fetch_all(&mut *tx)
            .await
            .map_err(state_err)?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect();

    let we_created_hydra = recorded.iter().any(|(id, _)| id.starts_with("hydra/"));
    let hydra_version = if we_created_hydra {
        None
    } else {
        let exists: Option<String> =
            sqlx::query_scalar("select to_regclass('schemaversion')::text")
                .fetch_one(&mut *tx)
                .await
                .map_err(state_err)?;
        match exists {
            None => None,
            Some(_) => {
                let version: Option<i32> =
                    sqlx::query_scalar("select max(version) from SchemaVersion")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(state_err)?;
                Some(version.unwrap_or(0))
            }
        }
    };
    let hydra_schema = match hydra_version {
        Some(version) if version < MIN_HYDRA_SCHEMA_VERSION => {
            return Err(MigrateError::HydraTooOld {
                found: version,
                needed: MIN_HYDRA_SCHEMA_VERSION,
            })
        }
        Some(version) => HydraSchema::Hydra { version },
        None => HydraSchema::Ours,
    };

    // Owned copies (Migration is Copy): holding references into the
    // slices across awaits trips up the Send check of this future.
    let sets = pending_sets(&hydra_schema, hydra, sluice);
    let mut applied = Vec::new();
    for m in sets {
        let id = m.id();
        let checksum = m.checksum();
        let recorded_checksum = recorded
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, c)| c.clone());
        match recorded_checksum {
            Some(c) if c == checksum => continue,
            Some(c) => {
                return Err(MigrateError::Edited {
                    id,
                    recorded: c,
                    current: checksum,
                })
            }
            None => {}
        }
        // A plain `&str` runs as a simple query: several statements at once.
        sqlx::Executor::execute(&mut *tx, m.sql)
            .await
            .map_err(|e| MigrateError::Apply {
                id: id.clone(),
                cause: super::describe_sqlx_error(&e),
            })?;
        sqlx::query("insert into SluiceSchemaMigrations (id, checksum) values ($1, $2)")
            .bind(&id)
            .bind(&checksum)
            .execute(&mut *tx)
            .await
            .map_err(state_err)?;
        tracing::info!(migration = %id, "applied");
        applied.push(id);
    }
    tx.commit().await.map_err(state_err)?;
    Ok(MigrateReport {
        hydra_schema,
        applied,
    })
}

/// The sets to consider, in order.
fn pending_sets(schema: &HydraSchema, hydra: &[Migration], sluice: &[Migration]) -> Vec<Migration> {
    match schema {
        HydraSchema::Ours => hydra.iter().chain(sluice).copied().collect(),
        HydraSchema::Hydra { .. } => sluice.to_vec(),
    }
}
