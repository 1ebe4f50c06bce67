//! `queue-runner serve`: wires the database, the store, the gRPC service,
//! the HTTP endpoints, the notification listener and the driver together,
//! and runs them until shutdown.
//!
//! Invariant: start-up either brings every part up or fails with one line
//! that names the part and the cause; nothing half-started keeps running.

use std::time::Duration;

use anyhow::Context;
use sluice_core::Config as CoreConfig;
use sqlx::postgres::PgListener;
use tokio::sync::{mpsc, watch};

use crate::agents::FromAgent;
use crate::config::ServeConfig;
use crate::driver::{Driver, DriverConfig, DriverEvent, Flushed};
use crate::status::StatusSnapshot;
use crate::store::Store;
use crate::{binary_cache, dashboard, db, embedded, grpc, http, status_row};

/// The channels the queue runner listens to.
pub const CHANNELS: [&str; 6] = [
    "builds_added",
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobset_shares_changed",
];

/// How often the driver compares the queue with what it holds, besides
/// reacting to notifications.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Addresses the parts actually bound (useful with port 0 in tests).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

/// Runs the queue runner until `shutdown` completes.
pub async fn run(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (bound_tx, _bound_rx) = tokio::sync::oneshot::channel();
    run_with(config, shutdown, bound_tx).await
}

/// [`run`], reporting the bound addresses once everything is up.
pub async fn run_with(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    bound: tokio::sync::oneshot::Sender<Bound>,
) -> anyhow::Result<()> {
    // Inputs first, so that a bad one fails before anything is created.
    let tokens = grpc::Tokens::from_file(&config.agent_token_file)?;
    if let Some(url) = &config.database_url {
        db::connect_options(url)?;
    }
    // The signing key is read here, so a missing or malformed file stops
    // the start-up before anything runs; the uploader gets its store
    // below.
    let signing_key = match &config.binary_cache {
        Some(cache) => binary_cache::read_signing_key(cache)?,
        None => None,
    };

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;

    // The database: given, or our own.
    let (url, embedded) = match &config.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let dir = config.data_dir.clone();
            let server = tokio::task::spawn_blocking(move || embedded::Embedded::start(&dir))
                .await
                .context("starting the embedded PostgreSQL")?
                .context("starting the embedded PostgreSQL")?;
            (server.url(), Some(server))
        }
    };
    match &embedded {
        Some(server) => tracing::info!(
            server = %db::describe_server(&url),
            data_dir = %config.data_dir.join("postgres").display(),
            adopted = server.was_adopted(),
            "database: the embedded PostgreSQL"
        ),
        None => tracing::info!(server = %db::describe_server(&url), "database"),
    }
    let pool = db::pool(&url, 16, Duration::from_secs(30)).await?;
    let (aborted, in_progress) = {
        // The migration takes a transaction-level advisory lock, so a
        // pooled connection serves it as well as a dedicated one.
        let mut conn = pool.acquire().await.context("connecting to the database")?;
        db::migrate::migrate(&mut conn).await?;
        let aborted =
            db::results::abort_busy_steps_at_startup(&mut conn, crate::driver::unix_now())
                .await
                .context("aborting steps left busy by a previous run")?;
        // Agents may still run these: the driver waits a lease for them.
        let in_progress = db::results::attempts_in_progress(&mut conn)
            .await
            .context("reading the attempts a previous run left in progress")?;
        (aborted, in_progress)
    };
    if aborted > 0 {
        tracing::warn!(
            aborted,
            "marked steps left busy by a previous run as aborted"
        );
    }

    let connection = match &config.store_socket {
        Some(socket) => {
            tracing::info!(socket = %socket.display(), "store: the Nix daemon's socket");
            grpc::StoreConnection::Socket(socket.clone())
        }
        None => {
            tracing::info!("store: the local Nix store, served by `nix-daemon --stdio`");
            grpc::StoreConnection::local_stdio()
        }
    };
    // Two pools on the same store: NAR transfers for agents never take
    // the connections that ingestion and dispatch need. They share one
    // path-info cache.
    let driver_store = grpc::LocalStore::new(connection.clone(), config.store_connections);
    let transfer_store = driver_store.sibling(connection.clone(), config.transfer_connections);
    // The binary cache uploader reads through a third sibling of its own.
    let binary_cache = match &config.binary_cache {
        Some(cache) => {
            let store = driver_store.sibling(connection, binary_cache::UPLOAD_CONNECTIONS);
            let uploader = binary_cache::open(cache, signing_key, store)?;
            let signed_by = uploader
                .config()
                .signing_key
                .as_ref()
                .map(|k| k.public_key().to_string());
            tracing::info!(
                uri = %cache.destination,
                compression = %cache.compression,
                public_key = signed_by.as_deref().unwrap_or("none: unsigned"),
                "binary cache"
            );
            // Found out now, not at the first build: a cache that cannot
            // be reached, or holds another store's paths.
            let check = uploader.clone();
            tokio::spawn(async move {
                if let Err(e) = check.ensure_cache_info().await {
                    tracing::warn!("binary cache: {e}");
                }
            });
            Some(uploader)
        }
        None => None,
    };
    let store = Store::new(driver_store);
    store
        .connect()
        .await
        .context("opening the queue runner's Nix store")?;

    let (events_tx, events_rx) = mpsc::channel::<DriverEvent>(16_384);
    let (status_tx, status_rx) = watch::channel(StatusSnapshot::default());
    let attempts = grpc::Attempts::new();
    // Before any agent can call: what they report of these waits for the
    // driver instead of being refused.
    attempts.expect(
        in_progress
            .iter()
            .map(|row| crate::agents::AttemptId(row.id)),
    );

    // Agents → driver.
    let (agents_tx, mut agents_rx) = mpsc::channel::<FromAgent>(4096);
    {
        let events = events_tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = agents_rx.recv().await {
                if events.send(DriverEvent::Agent(msg)).await.is_err() {
                    break;
                }
            }
        });
    }
    let (grpc_stop_tx, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = grpc::QueueRunnerService::new(
        grpc::ServiceConfig {
            // Three heartbeats per lease: a lease runs out only after
            // several were missed.
            heartbeat_interval: (config.lease / 3)
                .clamp(Duration::from_millis(200), Duration::from_secs(10)),
            ..grpc::ServiceConfig::new(config.data_dir.clone())
        },
        tokens,
        transfer_store,
        attempts.clone(),
        agents_tx,
    );
    let (grpc_addr, grpc_task) = service
        .spawn(config.grpc_listen, async move {
            let _ = grpc_stop_rx.await;
        })
        .await?;
    // Filled by the dashboard's sampler, started with the driver below.
    let (figures_tx, figures_rx) = watch::channel(dashboard::Figures::default());
    let http_state = http::HttpState {
        status: status_rx.clone(),
        figures: figures_rx,
        data_dir: config.data_dir.clone(),
        refresh: config.status_interval,
    };
    let (http_addr, http_task) = http::spawn(config.http_listen, http_state)
        .await
        .with_context(|| format!("listening for HTTP on {}", config.http_listen))?;

    // Database notifications → driver.
    let mut listener = PgListener::connect(&url)
        .await
        .context("listening for database notifications")?;
    listener
        .listen_all(CHANNELS)
        .await
        .context("listening for database notifications")?;
    let listen_task = {
        let events = events_tx.clone();
        tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if events
                            .send(DriverEvent::Notification(n.channel().to_string()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    // The connection was lost and will be re-established:
                    // notifications may be lost, so look again.
                    Ok(None) => {
                        tracing::warn!("lost the database notification connection; resyncing");
                        if events.send(DriverEvent::Resync).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "database notifications failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        })
    };

    let driver_config = DriverConfig {
        core: CoreConfig {
            max_unsupported_time: config.unsupported_grace,
            max_tries: config.max_tries,
            retry_interval: config.retry_interval,
            ..CoreConfig::default()
        },
        data_dir: config.data_dir.clone(),
        max_log_bytes: config.max_log_bytes,
        max_output_bytes: config.max_output_bytes,
        load_batch: i64::from(config.load_batch),
        shutdown_timeout: config.shutdown_timeout,
        max_pending_writes: config.max_pending_writes,
        lease: config.lease,
        max_cpu_pressure: config.max_cpu_pressure,
        min_free_disk_mb: config.min_free_disk_mb,
        order: config.dispatch_order,
    };
    let db_pool = pool.clone();
    let mut driver = Driver::new(
        driver_config,
        pool,
        store,
        attempts,
        events_tx.clone(),
        events_rx,
        status_tx,
    );
    driver.resume_attempts(in_progress);
    // Successful builds are finished only once their outputs are in the
    // cache (see `driver::upload`).
    if let Some(uploader) = binary_cache {
        driver.upload_to(uploader);
    }
    // The status row and the dashboard's figures: tasks of their own on
    // the pool, which never hold up the driver or the writer.
    let status_row_task =
        status_row::spawn(db_pool.clone(), status_rx.clone(), config.status_interval);
    let figures_task = dashboard::spawn(
        db_pool.clone(),
        status_rx,
        config.data_dir.clone(),
        config.status_interval,
        figures_tx,
    );
    let _ = bound.send(Bound {
        grpc: grpc_addr,
        http: http_addr,
    });
    tracing::info!(%grpc_addr, %http_addr, "queue runner up");
    // A periodic look at the queue: an evaluator's transaction may commit
    // a build id below one already loaded, and a notification can be lost.
    let resync_task = {
        let events = events_tx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RESYNC_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                if events.send(DriverEvent::Resync).await.is_err() {
                    break;
                }
            }
        })
    };
    {
        let events = events_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = events.send(DriverEvent::Shutdown).await;
        });
    }
    drop(events_tx);

    // Shutdown, in order: the driver stops taking work and flushes its
    // writes; then the agents are told and the listeners close; the
    // embedded database (if ours) stops last.
    match driver.run().await {
        Flushed::Done { pending, took } => tracing::info!(
            pending,
            took_ms = took.as_millis() as u64,
            "shutting down: pending database writes flushed"
        ),
        Flushed::TimedOut { pending, after } => tracing::error!(
            pending,
            after_s = after.as_secs(),
            "shutting down: gave up waiting for pending database writes"
        ),
    }
    listen_task.abort();
    resync_task.abort();
    let _ = grpc_stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(5), grpc_task).await {
        Ok(_) => tracing::info!("shutting down: agents told, gRPC listener closed"),
        Err(_) => tracing::warn!("shutting down: the gRPC service did not stop within 5 s"),
    }
    http_task.abort();
    status_row_task.abort();
    figures_task.abort();
    // Close our connections before the database goes, so none fails.
    db_pool.close().await;
    if let Some(server) = embedded {
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .context("stopping the embedded PostgreSQL")?;
        tracing::info!("shutting down: the embedded PostgreSQL stopped");
    }
    tracing::info!("queue runner stopped");
    Ok(())
}
