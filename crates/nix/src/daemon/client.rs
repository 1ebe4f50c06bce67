//! The async Nix daemon client: a connection over a Unix socket or the
//! stdio of a `nix-daemon --stdio` child, and one method per operation.
//!
//! Operations take `&mut self`, so a connection runs one at a time; open
//! several clients for parallelism. Log output reaches the logger set with
//! [`DaemonClient::set_logger`] (or a channel, [`DaemonClient::log_to`]) as
//! each message arrives, while the operation is still running.
//!
//! Cancellation: dropping an operation's future closes the connection (see
//! `daemon::connection`); the daemon then interrupts the operation, and
//! every later call returns [`ClientError::Closed`]. An error the daemon
//! reports ([`ClientError::Remote`]) leaves the connection usable; every
//! other error closes it. There are no built-in timeouts: wrap a call in
//! `tokio::time::timeout`, whose expiry drops it.
//!
//! Limits ([`Limits`]) bound every string and collection the daemon sends;
//! a longer one (e.g. a build log line over 16 MiB without a newline)
//! closes the connection with [`ClientError::Protocol`].

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Buf;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::derivation::BasicDerivation;
use crate::hash::HashAlgo;
use crate::nar::{NarDecoder, NarError, NarHasher, NarLimits, NarSummary};
use crate::store_path::{ContentAddressMethod, MakeStorePathError, StoreDir, StorePath};

use super::build::{BuildResult, DrvOutput, KeyedBuildResult, Realisation};
use super::connection::{Call, Connection, Logger};
use super::handshake::{self, HandshakeError};
use super::stderr::{self, LogEvent, RemoteError};
use super::types::{
    ca_method_wire, encode_basic_derivation, BuildMode, ClientOptions, DaemonInfo, DerivedPath,
    PathInfo,
};
use super::wire::{Limits, Malformed, WireReader, WireWriter};
use super::{op, ProtocolVersion, WireContext, FEATURE_REALISATION_WITH_PATH};

/// Why an operation failed. Each message names the operation and its
/// subject.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to the Nix daemon at '{path}': {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("starting the Nix daemon process: {0}")]
    Spawn(#[source] io::Error),
    #[error("handshake with the Nix daemon: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("{op}: I/O error talking to the Nix daemon: {source}")]
    Io { op: String, source: io::Error },
    #[error("{op}: the Nix daemon closed the connection")]
    Disconnected { op: String },
    #[error("{op}: malformed data from the Nix daemon: {source}")]
    Protocol { op: String, source: Malformed },
    #[error("{op}: malformed NAR from the Nix daemon: {source}")]
    Nar { op: String, source: NarError },
    #[error("{op}: {source}")]
    Remote { op: String, source: RemoteError },
    #[error("{op}: the connection was closed by an earlier failure or a cancelled operation")]
    Closed { op: String },
    #[error("{op}: not possible with daemon protocol {version}: {what}")]
    Unsupported {
        op: String,
        version: ProtocolVersion,
        what: &'static str,
    },
    #[error("{op}: reading the data to send failed: {source}")]
    Source { op: String, source: io::Error },
    #[error("{op}: writing the received data failed: {source}")]
    Sink { op: String, source: io::Error },
    #[error("{op}: {source}")]
    Derivation {
        op: String,
        source: MakeStorePathError,
    },
}

impl ClientError {
    /// The daemon's own error, if it reported one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            ClientError::Remote { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub store_dir: StoreDir,
    pub limits: Limits,
}

/// A connection to a Nix daemon. See the module documentation.
pub struct DaemonClient {
    pub(crate) conn: Option<Connection>,
    pub(crate) ctx: WireContext,
    pub(crate) limits: Limits,
    pub(crate) logger: Logger,
    info: DaemonInfo,
}

impl std::fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClient")
            .field("info", &self.info)
            .field("open", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

fn default_logger() -> Logger {
    Box::new(|event: LogEvent| match event.build_log_line() {
        Some(line) => tracing::debug!(target: "nix_daemon::build", "{line}"),
        None => tracing::trace!(target: "nix_daemon", ?event),
    })
}

impl DaemonClient {
    /// Connects to the daemon socket at `path` (e.g.
    /// `/nix/var/nix/daemon-socket/socket`).
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::connect_with(path, ConnectOptions::default()).await
    }

    pub async fn connect_with(path: &Path, options: ConnectOptions) -> Result<Self, ClientError> {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Self::handshake(Connection::new(Box::new(r), Box::new(w), None), options).await
    }

    /// Starts `command` (typically `nix-daemon --stdio`) and speaks the
    /// protocol over its stdin and stdout. Its stderr is piped and logged
    /// with `tracing` (see [`super::child_stderr`]): what the daemon says
    /// when the connection closes at debug level, anything else at warn
    /// level.
    pub async fn spawn(mut command: tokio::process::Command) -> Result<Self, ClientError> {
        Self::spawn_with(&mut command, ConnectOptions::default()).await
    }

    /// [`DaemonClient::spawn`] with options; `command`'s stdio settings are
    /// replaced.
    pub async fn spawn_with(
        command: &mut tokio::process::Command,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(ClientError::Spawn)?;
        if let Some(stderr) = child.stderr.take() {
            super::child_stderr::forward(stderr, child.id());
        }
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ClientError::Spawn(io::Error::other(
                "the child has no stdio pipes",
            )));
        };
        Self::handshake(
            Connection::new(Box::new(stdout), Box::new(stdin), Some(child)),
            options,
        )
        .await
    }

    /// Speaks the protocol over an already open byte stream.
    pub async fn from_stream<R, W>(
        reader: R,
        writer: W,
        options: ConnectOptions,
    ) -> Result<Self, ClientError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        Self::handshake(
            Connection::new(Box::new(reader), Box::new(writer), None),
            options,
        )
        .await
    }

    async fn handshake(mut conn: Connection, options: ConnectOptions) -> Result<Self, ClientError> {
        let limits = options.limits;
        let op = "handshake";
        let io_err = |source| ClientError::Io {
            op: op.into(),
            source,
        };
        let mut w = WireWriter::new();
        handshake::encode_hello(&mut w, ProtocolVersion::LATEST);
        conn.send(w.as_bytes()).await.map_err(io_err)?;
        let daemon_version = conn
            .reader
            .decode(limits, handshake::decode_daemon_hello)
            .await
            .map_err(|e| e.for_op(op))??;
        let version = handshake::negotiate(ProtocolVersion::LATEST, daemon_version)?;
        let mut features = BTreeSet::new();
        if handshake::exchanges_features(version) {
            let mut w = WireWriter::new();
            handshake::encode_features(&mut w);
            conn.send(w.as_bytes()).await.map_err(io_err)?;
            features = conn
                .reader
                .decode(limits, handshake::decode_features)
                .await
                .map_err(|e| e.for_op(op))?;
        }
        let mut w = WireWriter::new();
        handshake::encode_client_info(&mut w);
        conn.send(w.as_bytes()).await.map_err(io_err)?;
        let (nix_version, trust) = conn
            .reader
            .decode(limits, |r| handshake::decode_daemon_info(r, version))
            .await
            .map_err(|e| e.for_op(op))?;
        let mut logger = default_logger();
        conn.reader
            .process_stderr(limits, &mut logger)
            .await
            .map_err(|e| e.for_op(op))?
            .map_err(|source| ClientError::Remote {
                op: op.into(),
                source,
            })?;
        let ctx = WireContext {
            version,
            realisation_with_path: features.contains(FEATURE_REALISATION_WITH_PATH),
            store_dir: options.store_dir,
        };
        Ok(DaemonClient {
            conn: Some(conn),
            ctx,
            limits,
            logger,
            info: DaemonInfo {
                version,
                daemon_version,
                features,
                nix_version,
                trust,
            },
        })
    }

    /// What the handshake established.
    pub fn info(&self) -> &DaemonInfo {
        &self.info
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.ctx.version
    }

    /// Realisations are identified by `.drv` path ([`DrvOutput::ByPath`])
    /// rather than by hash modulo ([`DrvOutput::ByHash`]).
    pub fn realisations_by_path(&self) -> bool {
        self.ctx.realisation_with_path
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.ctx.store_dir
    }

    /// Gives back a read buffer that a big answer grew past `keep` bytes:
    /// an idle connection kept in a pool would hold it as long as it
    /// lives.
    pub fn shrink_buffers(&mut self, keep: usize) {
        if let Some(conn) = &mut self.conn {
            conn.reader.shrink(keep);
        }
    }

    /// False once an error or a cancellation closed the connection.
    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    /// Sends every later log event to `logger`, as it arrives. It is called
    /// inline while the connection is read, so it should be quick (e.g.
    /// push into a channel).
    pub fn set_logger(&mut self, logger: impl FnMut(LogEvent) + Send + 'static) {
        self.logger = Box::new(logger);
    }

    /// Sends every later log event into `tx` (dropped if the receiver is gone).
    pub fn log_to(&mut self, tx: mpsc::UnboundedSender<LogEvent>) {
        self.set_logger(move |event| {
            let _ = tx.send(event);
        });
    }

    /// The process id of the `--stdio` child serving this connection, if
    /// there is one and it has not been waited for.
    pub fn child_pid(&self) -> Option<u32> {
        self.conn.as_ref()?.child.as_ref()?.id()
    }

    /// Closes the connection; waits up to `grace` for a `--stdio` child to
    /// exit, then kills it.
    pub async fn close(mut self, grace: Duration) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let _ = conn.writer.shutdown().await;
        drop(conn.writer);
        drop(conn.reader);
        if let Some(mut child) = conn.child.take() {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }

    fn path_str(&self, path: &StorePath) -> String {
        self.ctx.store_dir.print(path)
    }

    fn unsupported(&self, op: String, what: &'static str) -> ClientError {
        ClientError::Unsupported {
            op,
            version: self.ctx.version,
            what,
        }
    }

    /// Applies `options` to the operations that follow on this connection.
    pub async fn set_options(&mut self, options: &ClientOptions) -> Result<(), ClientError> {
        let mut w = WireWriter::new();
        w.u64(op::SET_OPTIONS);
        options.encode(&mut w);
        let mut call = Call::begin(self, "setOptions".into())?;
        call.send(&w).await?;
        call.process_stderr().await?;
        call.done();
        Ok(())
    }

    pub async fn is_valid_path(&mut self, path: &StorePath) -> Result<bool, ClientError> {
        let p = self.path_str(path);
        let mut w = WireWriter::new();
        w.u64(op::IS_VALID_PATH).str(&p);
        let mut call = Call::begin(self, format!("isValidPath {p}"))?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let valid = call.read(|r| r.bool()).await?;
        Ok(call.finish(valid))
    }

    /// The subset of `paths` that is valid; with `substitute`, the daemon
    /// first tries to substitute the missing ones.
    pub async fn query_valid_paths<'p>(
        &mut self,
        paths: impl IntoIterator<Item = &'p StorePath, IntoIter: ExactSizeIterator>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        let mut w = WireWriter::new();
        w.u64(op::QUERY_VALID_PATHS)
            .store_paths(&self.ctx.store_dir, paths)
            .bool(substitute);
        let dir = self.ctx.store_dir.clone();
        let mut call = Call::begin(self, "queryValidPaths".into())?;
        call.send(&w).await?;
        call.process_stderr().await?;
        // Element by element, so a large reply is not re-parsed as it arrives.
        let n = call.read(|r| r.count("valid paths")).await?;
        let mut valid = BTreeSet::new();
        for _ in 0..n {
            valid.insert(call.read(|r| r.store_path(&dir, "valid path")).await?);
        }
        Ok(call.finish(valid))
    }

    /// The path's metadata, or `None` if it is not valid.
    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<PathInfo>, ClientError> {
        let p = self.path_str(path);
        let mut w = WireWriter::new();
        w.u64(op::QUERY_PATH_INFO).str(&p);
        let dir = self.ctx.store_dir.clone();
        let mut call = Call::begin(self, format!("queryPathInfo {p}"))?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let info = call
            .read(|r| {
                if !r.bool()? {
                    return Ok(None);
                }
                PathInfo::decode_unkeyed(r, &dir, path.clone()).map(Some)
            })
            .await?;
        Ok(call.finish(info))
    }

    /// The metadata of each of `paths` (`None` where it is not valid), in
    /// the same order: one `QueryPathInfo` per path, all written at once
    /// while the replies are read, so the batch costs one round trip. The
    /// requests are written concurrently with reading the replies, so a
    /// daemon blocked on a full socket never deadlocks us; callers still
    /// bound the batch (memory: the request buffer and the replies).
    ///
    /// An error the daemon reports for one path closes the connection (the
    /// replies after it are left unread).
    pub async fn query_path_infos(
        &mut self,
        paths: &[StorePath],
    ) -> Result<Vec<Option<PathInfo>>, ClientError> {
        let mut w = WireWriter::new();
        for path in paths {
            w.u64(op::QUERY_PATH_INFO).str(&self.path_str(path));
        }
        let dir = self.ctx.store_dir.clone();
        let op = match paths {
            [one] => format!("queryPathInfo {}", self.path_str(one)),
            _ => format!("queryPathInfo of {} paths", paths.len()),
        };
        let mut call = Call::begin(self, op)?;
        let infos = call
            .send_and_read_replies(&w, paths.len(), |i, r| {
                if !r.bool()? {
                    return Ok(None);
                }
                PathInfo::decode_unkeyed(r, &dir, paths[i].clone()).map(Some)
            })
            .await?;
        Ok(call.finish(infos))
    }

    /// Streams the NAR of `path` into `sink`, checking it as it passes;
    /// returns its hash and size.
    pub async fn nar_from_path(
        &mut self,
        path: &StorePath,
        sink: &mut (dyn AsyncWrite + Send + Unpin),
    ) -> Result<NarSummary, ClientError> {
        let p = self.path_str(path);
        let mut w = WireWriter::new();
        w.u64(op::NAR_FROM_PATH).str(&p);
        let limits = self.limits;
        let mut call = Call::begin(self, format!("narFromPath {p}"))?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let op = call.op.clone();
        let reader = call.reader()?;
        // The daemon archives its own store, which Nix 2.8 does at any
        // depth: allow deeper trees than for untrusted archives.
        let mut decoder = NarDecoder::with_limits(NarLimits {
            max_depth: 1024,
            ..NarLimits::default()
        });
        let mut hasher = NarHasher::new();
        loop {
            if reader.buf.is_empty() {
                reader.fill().await.map_err(|e| e.for_op(&op))?;
            }
            let fed = decoder.feed(&reader.buf, |_| Ok::<(), std::convert::Infallible>(()));
            let used = match fed {
                Ok(used) => used,
                Err(crate::nar::FeedError::Sink(never)) => match never {},
                Err(crate::nar::FeedError::Nar(source)) => {
                    // Daemons check the path only after `STDERR_LAST`, and
                    // then send an error where the NAR (or the rest of it)
                    // should be, and hang up.
                    let at = source.offset().checked_sub(hasher.size());
                    if let Some(at) = at.and_then(|at| usize::try_from(at).ok()) {
                        if reader.buf.get(at..at + 8)
                            == Some(&stderr::STDERR_ERROR.to_le_bytes()[..])
                        {
                            reader.buf.advance(at);
                            if let Ok(stderr::StderrMessage::Error(source)) =
                                reader.decode(limits, stderr::decode).await
                            {
                                return Err(ClientError::Remote { op, source });
                            }
                        }
                    }
                    return Err(ClientError::Nar { op, source });
                }
            };
            let chunk = reader.buf.split_to(used);
            hasher.update(&chunk);
            sink.write_all(&chunk)
                .await
                .map_err(|source| ClientError::Sink {
                    op: op.clone(),
                    source,
                })?;
            if decoder.is_done() {
                break;
            }
        }
        sink.flush().await.map_err(|source| ClientError::Sink {
            op: op.clone(),
            source,
        })?;
        Ok(call.finish(hasher.summary()))
    }

    /// Imports a path from its NAR, read from `nar`; `info` must describe
    /// it (hash and size are checked by the daemon). Without
    /// `dont_check_sigs` an untrusted client needs valid signatures.
    pub async fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        nar: &mut (dyn AsyncRead + Send + Unpin),
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<(), ClientError> {
        let p = self.path_str(&info.path);
        let mut w = WireWriter::new();
        w.u64(op::ADD_TO_STORE_NAR).str(&p);
        info.encode_unkeyed(&mut w, &self.ctx.store_dir);
        w.bool(repair).bool(dont_check_sigs);
        let mut call = Call::begin(self, format!("addToStoreNar {p}"))?;
        call.send(&w).await?;
        call.send_framed_and_process_stderr(nar).await?;
        call.done();
        Ok(())
    }

    /// Adds `data` as a content-addressed path named `name`: the file's
    /// bytes for `Flat` and `Text`, a NAR for `Recursive`. Text paths may
    /// only have references, and need SHA-256.
    pub async fn add_to_store(
        &mut self,
        name: &str,
        method: ContentAddressMethod,
        algo: HashAlgo,
        references: &BTreeSet<StorePath>,
        repair: bool,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<PathInfo, ClientError> {
        let mut w = WireWriter::new();
        w.u64(op::ADD_TO_STORE)
            .str(name)
            .str(&ca_method_wire(method, algo))
            .store_paths(&self.ctx.store_dir, references)
            .bool(repair);
        let dir = self.ctx.store_dir.clone();
        let mut call = Call::begin(self, format!("addToStore {name}"))?;
        call.send(&w).await?;
        call.send_framed_and_process_stderr(data).await?;
        let info = call.read(|r| PathInfo::decode_keyed(r, &dir)).await?;
        Ok(call.finish(info))
    }

    /// Adds a text file (e.g. a `.drv`) the way `builtins.toFile` and
    /// `nix-instantiate` do, returning its path info.
    pub async fn add_text_to_store(
        &mut self,
        name: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<PathInfo, ClientError> {
        let mut data = text;
        self.add_to_store(
            name,
            ContentAddressMethod::Text,
            HashAlgo::Sha256,
            references,
            false,
            &mut data,
        )
        .await
    }

    /// Builds `drv` (whose inputs must be valid) as if it were `drv_path`,
    /// without the `.drv` being in the store.
    pub async fn build_derivation(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
    ) -> Result<BuildResult, ClientError> {
        let p = self.path_str(drv_path);
        let op_name = format!("buildDerivation {p}");
        let mut w = WireWriter::new();
        w.u64(op::BUILD_DERIVATION).str(&p);
        encode_basic_derivation(&mut w, &self.ctx.store_dir, drv).map_err(|source| {
            ClientError::Derivation {
                op: op_name.clone(),
                source,
            }
        })?;
        w.u64(mode.to_wire());
        let ctx = self.ctx.clone();
        let mut call = Call::begin(self, op_name)?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let result = call.read(|r| BuildResult::decode(r, &ctx)).await?;
        Ok(call.finish(result))
    }

    fn encode_derived_paths(&self, w: &mut WireWriter, paths: &[DerivedPath]) {
        w.strings(paths.iter().map(|p| p.to_wire(&self.ctx.store_dir)));
    }

    /// Builds or substitutes `paths`; fails if any of them fails.
    pub async fn build_paths(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<(), ClientError> {
        let mut w = WireWriter::new();
        w.u64(op::BUILD_PATHS);
        self.encode_derived_paths(&mut w, paths);
        w.u64(mode.to_wire());
        let mut call = Call::begin(self, format!("buildPaths ({} paths)", paths.len()))?;
        call.send(&w).await?;
        call.process_stderr().await?;
        call.read(|r| r.u64()).await?;
        call.done();
        Ok(())
    }

    /// Builds or substitutes `paths`, returning one result each.
    pub async fn build_paths_with_results(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
    ) -> Result<Vec<KeyedBuildResult>, ClientError> {
        let mut w = WireWriter::new();
        w.u64(op::BUILD_PATHS_WITH_RESULTS);
        self.encode_derived_paths(&mut w, paths);
        w.u64(mode.to_wire());
        let ctx = self.ctx.clone();
        let mut call = Call::begin(
            self,
            format!("buildPathsWithResults ({} paths)", paths.len()),
        )?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let results = call
            .read(|r| KeyedBuildResult::decode_list(r, &ctx))
            .await?;
        Ok(call.finish(results))
    }

    /// Makes `path` valid, by substitution if needed.
    pub async fn ensure_path(&mut self, path: &StorePath) -> Result<(), ClientError> {
        let p = self.path_str(path);
        self.simple_op(op::ENSURE_PATH, &p, format!("ensurePath {p}"))
            .await
    }

    /// Protects `path` from garbage collection while this connection lives.
    pub async fn add_temp_root(&mut self, path: &StorePath) -> Result<(), ClientError> {
        let p = self.path_str(path);
        self.simple_op(op::ADD_TEMP_ROOT, &p, format!("addTempRoot {p}"))
            .await
    }

    /// Registers the symlink at `link` (outside the store, pointing into
    /// it) as a garbage collector root, for as long as it exists.
    pub async fn add_indirect_root(&mut self, link: &Path) -> Result<(), ClientError> {
        let l = link.to_string_lossy().into_owned();
        self.simple_op(op::ADD_INDIRECT_ROOT, &l, format!("addIndirectRoot {l}"))
            .await
    }

    async fn simple_op(
        &mut self,
        code: u64,
        arg: &str,
        op_name: String,
    ) -> Result<(), ClientError> {
        let mut w = WireWriter::new();
        w.u64(code).str(arg);
        let mut call = Call::begin(self, op_name)?;
        call.send(&w).await?;
        call.process_stderr().await?;
        call.read(|r| r.u64()).await?;
        call.done();
        Ok(())
    }

    /// Makes `gc_root` a symlink to `path` and a permanent GC root; returns
    /// the root's absolute path. Needs Nix 2.20+ (protocol 1.37+); on older
    /// daemons create the symlink yourself and use
    /// [`DaemonClient::add_indirect_root`].
    pub async fn add_perm_root(
        &mut self,
        path: &StorePath,
        gc_root: &Path,
    ) -> Result<String, ClientError> {
        let p = self.path_str(path);
        let root = gc_root.to_string_lossy().into_owned();
        let op_name = format!("addPermRoot {p} {root}");
        if self.ctx.version < ProtocolVersion::new(1, 37) {
            return Err(self.unsupported(op_name, "AddPermRoot needs protocol 1.37 (Nix 2.20)"));
        }
        let mut w = WireWriter::new();
        w.u64(op::ADD_PERM_ROOT).str(&p).str(&root);
        let mut call = Call::begin(self, op_name)?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let root = call.read(|r| r.string("perm root")).await?;
        Ok(call.finish(root))
    }

    /// The realisation of an output of a content-addressed derivation, if
    /// known. `id` must be of the kind [`DaemonClient::realisations_by_path`]
    /// says.
    pub async fn query_realisation(
        &mut self,
        id: &DrvOutput,
    ) -> Result<Option<Realisation>, ClientError> {
        let op_name = format!("queryRealisation {}", self.describe(id));
        let mut w = WireWriter::new();
        w.u64(op::QUERY_REALISATION);
        if id.encode(&mut w, &self.ctx).is_none() {
            return Err(self.unsupported(op_name, WRONG_ID_KIND));
        }
        let ctx = self.ctx.clone();
        let mut call = Call::begin(self, op_name)?;
        call.send(&w).await?;
        call.process_stderr().await?;
        let found = call
            .read(|r: &mut WireReader<'_>| Realisation::decode_query_reply(r, &ctx, id))
            .await?;
        Ok(call.finish(found))
    }

    /// Records that an output of a content-addressed derivation was built
    /// as `realisation.out_path` (which must be valid).
    pub async fn register_drv_output(
        &mut self,
        realisation: &Realisation,
    ) -> Result<(), ClientError> {
        let op_name = format!("registerDrvOutput {}", self.describe(&realisation.id));
        let mut w = WireWriter::new();
        w.u64(op::REGISTER_DRV_OUTPUT);
        if realisation.encode(&mut w, &self.ctx).is_none() {
            return Err(self.unsupported(op_name, WRONG_ID_KIND));
        }
        let mut call = Call::begin(self, op_name)?;
        call.send(&w).await?;
        call.process_stderr().await?;
        call.done();
        Ok(())
    }

    fn describe(&self, id: &DrvOutput) -> String {
        match id {
            DrvOutput::ByHash { .. } => id.legacy_id().unwrap_or_default(),
            DrvOutput::ByPath { drv_path, output } => {
                format!("{}!{output}", self.path_str(drv_path))
            }
        }
    }
}

const WRONG_ID_KIND: &str = "the daemon identifies realisations by .drv path with \
    realisation-with-path-not-hash and by derivation hash without it; \
    the id given is of the other kind";

/// Compile-time check: operations can be spawned on a multi-threaded runtime.
#[cfg(test)]
#[allow(dead_code)]
fn operations_are_send(
    client: &mut DaemonClient,
    path: &StorePath,
    drv: &BasicDerivation,
    sink: &mut (dyn AsyncWrite + Send + Unpin),
    source: &mut (dyn AsyncRead + Send + Unpin),
    info: &PathInfo,
) {
    fn is_send<T: Send>(_: T) {}
    is_send(client.build_derivation(path, drv, BuildMode::Normal));
    is_send(client.nar_from_path(path, sink));
    is_send(client.add_to_store_nar(info, source, false, false));
}
