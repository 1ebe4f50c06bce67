//! Settings of `queue-runner serve`, from the command line and an optional
//! TOML file.
//!
//! Precedence: a command-line flag (or its environment variable) beats the
//! file, which beats the default. Every setting has the same name in both
//! places (`--grpc-listen` ↔ `grpc-listen`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Settings as one source gives them, each optional: the TOML file, or
/// the command line. The same struct is both, so every setting has a flag
/// named like its TOML key. In the file, unknown keys are an error, so a
/// typo is never ignored. The defaults written in the help texts are
/// checked against [`ServeConfig::resolve`] by a test.
#[derive(Debug, Default, Clone, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// PostgreSQL URL of the Hydra database, e.g.
    /// postgres://hydra@db.example.org/hydra or
    /// postgres://hydra@localhost/hydra?host=/run/postgresql.
    /// [default: none: a private PostgreSQL under --data-dir, started and
    /// stopped by the queue runner]
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// State directory: build logs (the web UI's HYDRA_DATA) and the
    /// embedded database [default: /var/lib/sluice]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the builder agents dial [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of the dashboard (/), /status, /status/machines and
    /// /metrics [default: 127.0.0.1:9198]
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// File with the tokens agents must present, one per line (`name:token`
    /// or a bare token of at least 16 characters). Required: here or as
    /// agent-token-file in --config.
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// Nix daemon socket of the queue runner's store [default: none: the
    /// local store, served by `nix-daemon --stdio` children (needs root)]
    #[arg(long, value_name = "PATH")]
    pub store_socket: Option<PathBuf>,
    /// Seconds a step waits for a machine that can build its system and
    /// features before its builds fail as unsupported [default: 120]
    #[arg(long, value_name = "SECONDS")]
    pub unsupported_grace_s: Option<u64>,
    /// Attempts at a step that fails for infrastructure reasons (aborted,
    /// builder lost) before its builds fail [default: 5]
    #[arg(long, value_name = "N")]
    pub max_tries: Option<u32>,
    /// Seconds before the first retry of such a step; later retries wait
    /// longer [default: 60]
    #[arg(long, value_name = "SECONDS")]
    pub retry_interval_s: Option<u64>,
    /// Largest build log kept per step, in bytes; a build that writes more
    /// fails with "log limit exceeded" [default: 67108864]
    #[arg(long, value_name = "BYTES")]
    pub max_log_bytes: Option<u64>,
    /// Largest total NAR size of a step's outputs, in bytes; larger fails
    /// with "output limit exceeded" [default: 2147483648]
    #[arg(long, value_name = "BYTES")]
    pub max_output_bytes: Option<u64>,
    /// Seconds a shutdown (SIGTERM or SIGINT) waits for pending database
    /// writes before it gives up on them [default: 30]
    #[arg(long, value_name = "SECONDS")]
    pub shutdown_timeout_s: Option<u64>,
    /// Database writes queued at most; while more wait (the database is
    /// slow or away), no new step is dispatched and no build loaded
    /// [default: 4096]
    #[arg(long, value_name = "N")]
    pub max_pending_writes: Option<usize>,
    /// Queued builds one load reads from the database at most; the next
    /// batch is read while the one before is applied. Smaller batches
    /// hold fewer temporaries at once and leave less of the heap
    /// fragmented [default: 250]
    #[arg(long, value_name = "N")]
    pub load_batch: Option<u32>,
    /// Seconds an agent's running steps are kept for it after its
    /// connection drops (and, after a restart, how long the queue runner
    /// waits for agents to report the steps they still run); past that
    /// the steps are aborted and retried [default: 30]
    #[arg(long, value_name = "SECONDS")]
    pub lease_s: Option<u64>,
    /// An agent whose CPU pressure (PSI "some avg10", in percent) is above
    /// this gets no new steps until it falls back; 0 turns the check off
    /// [default: 0]
    #[arg(long, value_name = "PERCENT")]
    pub max_cpu_pressure: Option<f32>,
    /// An agent with less free space than this in its store or its build
    /// directory, in MiB, gets no new steps until it has more; 0 turns the
    /// check off [default: 0]
    #[arg(long, value_name = "MIB")]
    pub min_free_disk_mb: Option<u64>,
    /// Connections to the queue runner's Nix store for control work:
    /// reading closures, preparing assignments, checking and post-processing
    /// results; at least 2, since a load asks the store on a second
    /// connection while it reads closures on its first [default: 8]
    #[arg(long, value_name = "N")]
    pub store_connections: Option<usize>,
    /// Connections to the queue runner's Nix store for NAR transfers
    /// (inputs agents fetch, outputs they upload), apart from the control
    /// ones, so slow transfers never stall dispatch [default: 16]
    #[arg(long, value_name = "N")]
    pub transfer_connections: Option<usize>,
    /// Which runnable step goes first, after global priority (bumps) and
    /// jobset shares: `critical-path` (the longest expected build time
    /// from the step to the end of the graph, from the history of build
    /// times) or `hydra` (build priority, then the oldest build)
    /// [default: critical-path]
    #[arg(long, value_name = "ORDER")]
    pub dispatch_order: Option<String>,
    /// Binary cache that built paths are uploaded to: file:///dir, or
    /// s3://bucket?region=…&endpoint=…&profile=… (Nix's store URI
    /// parameters: region, endpoint, scheme, profile, addressing-style,
    /// log-compression, priority, want-mass-query) [default: none: no
    /// uploads]
    #[arg(long, value_name = "URI")]
    pub binary_cache: Option<String>,
    /// Nix secret key file (`name:base64`, as `nix-store
    /// --generate-binary-cache-key` writes) that signs the binary cache's
    /// .narinfo files; needs --binary-cache [default: none: unsigned]
    #[arg(long, value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// Compression of the NARs uploaded to the binary cache: zstd, xz or
    /// none [default: zstd]
    #[arg(long, value_name = "METHOD")]
    pub binary_cache_compression: Option<String>,
    /// Seconds between writes of the queue runner's status (the JSON of
    /// /status) to the database's SystemStatus row 'queue-runner', which
    /// older Hydra web UIs read, and between the dashboard's reads of the
    /// queue and recent failures; at least 1 [default: 5]
    #[arg(long, value_name = "SECONDS")]
    pub status_interval_s: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {cause}")]
    Read { path: PathBuf, cause: String },
    #[error("config file {path}: {cause}")]
    Parse { path: PathBuf, cause: String },
    #[error("no agent token file: pass --agent-token-file or set agent-token-file in the config")]
    NoTokenFile,
    #[error("--dispatch-order '{0}': give critical-path or hydra")]
    DispatchOrder(String),
    #[error("--binary-cache: {0}")]
    BinaryCache(#[from] sluice_binary_cache::DestinationError),
    #[error("--binary-cache-compression: {0}")]
    Compression(#[from] sluice_binary_cache::UnknownCompression),
    #[error("--signing-key-file {0} is given, but no --binary-cache to sign for")]
    SigningKeyWithoutCache(PathBuf),
}

impl Settings {
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.into(),
            cause: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            cause: e.message().to_string(),
        })
    }
}

/// Everything `serve` runs with, resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `None`: start the embedded PostgreSQL under `data_dir`.
    pub database_url: Option<String>,
    /// `HYDRA_DATA` of the web UI: build logs go to `<data_dir>/build-logs`.
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub agent_token_file: PathBuf,
    /// The Nix daemon socket of the queue runner's store; `None`: serve the
    /// local store with `nix-daemon --stdio` children.
    pub store_socket: Option<PathBuf>,
    pub unsupported_grace: Duration,
    pub max_tries: u32,
    pub retry_interval: Duration,
    pub max_log_bytes: u64,
    pub max_output_bytes: u64,
    /// How long a shutdown waits for pending database writes.
    pub shutdown_timeout: Duration,
    /// Writes queued at most before dispatching pauses.
    pub max_pending_writes: usize,
    /// Queued builds read per load.
    pub load_batch: u32,
    /// How long a disconnected agent keeps its steps.
    pub lease: Duration,
    /// Capacity thresholds of agents (0: off).
    pub max_cpu_pressure: f32,
    pub min_free_disk_mb: u64,
    /// Store connections for control work, and for NAR transfers.
    pub store_connections: usize,
    pub transfer_connections: usize,
    /// The order of runnable steps.
    pub dispatch_order: sluice_core::ConfiguredOrder,
    /// Where built paths are uploaded; `None`: nowhere.
    pub binary_cache: Option<BinaryCacheConfig>,
    /// How often the `SystemStatus` row is written and the dashboard reads
    /// the database.
    pub status_interval: Duration,
}

/// The binary cache, as configured: its URI parsed, its key file not yet
/// read (`service` reads it first thing, so a missing file stops the
/// start-up with a clear error).
#[derive(Debug, Clone)]
pub struct BinaryCacheConfig {
    pub destination: sluice_binary_cache::Destination,
    pub signing_key_file: Option<PathBuf>,
    pub compression: sluice_binary_cache::Compression,
}

pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9198";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sluice";

impl ServeConfig {
    /// Merges the command line (`cli`: `None` where a flag was not given)
    /// over the file over the defaults.
    pub fn resolve(file: Settings, cli: Settings) -> Result<ServeConfig, ConfigError> {
        let file = cli.or(file);
        let parse = |s: &str| s.parse::<SocketAddr>().ok();
        Ok(ServeConfig {
            database_url: file.database_url,
            data_dir: file.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            grpc_listen: file
                .grpc_listen
                .or_else(|| parse(DEFAULT_GRPC_LISTEN))
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
            http_listen: file
                .http_listen
                .or_else(|| parse(DEFAULT_HTTP_LISTEN))
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9198))),
            agent_token_file: file.agent_token_file.ok_or(ConfigError::NoTokenFile)?,
            store_socket: file.store_socket,
            unsupported_grace: Duration::from_secs(file.unsupported_grace_s.unwrap_or(120)),
            max_tries: file.max_tries.unwrap_or(5),
            retry_interval: Duration::from_secs(file.retry_interval_s.unwrap_or(60)),
            max_log_bytes: file.max_log_bytes.unwrap_or(64 << 20),
            max_output_bytes: file.max_output_bytes.unwrap_or(2 << 30),
            shutdown_timeout: Duration::from_secs(file.shutdown_timeout_s.unwrap_or(30)),
            max_pending_writes: file.max_pending_writes.unwrap_or(4096).max(1),
            load_batch: file.load_batch.unwrap_or(250).max(1),
            lease: Duration::from_secs(file.lease_s.unwrap_or(30)),
            max_cpu_pressure: file.max_cpu_pressure.unwrap_or(0.0),
            min_free_disk_mb: file.min_free_disk_mb.unwrap_or(0),
            store_connections: file.store_connections.unwrap_or(8).max(2),
            transfer_connections: file.transfer_connections.unwrap_or(16).max(1),
            dispatch_order: match file.dispatch_order.as_deref() {
                None => sluice_core::ConfiguredOrder::CriticalPath,
                Some(name) => name
                    .parse()
                    .map_err(|_| ConfigError::DispatchOrder(name.to_owned()))?,
            },
            binary_cache: BinaryCacheConfig::resolve(
                file.binary_cache.as_deref(),
                file.signing_key_file,
                file.binary_cache_compression.as_deref(),
            )?,
            status_interval: Duration::from_secs(file.status_interval_s.unwrap_or(5).max(1)),
        })
    }
}

impl BinaryCacheConfig {
    /// `None` without a URI; a key file without one is an error (it was
    /// surely meant to sign something), a compression is then unused.
    fn resolve(
        uri: Option<&str>,
        signing_key_file: Option<PathBuf>,
        compression: Option<&str>,
    ) -> Result<Option<BinaryCacheConfig>, ConfigError> {
        let compression = compression
            .map(str::parse::<sluice_binary_cache::Compression>)
            .transpose()?
            .unwrap_or_default();
        let Some(uri) = uri else {
            return match signing_key_file {
                Some(file) => Err(ConfigError::SigningKeyWithoutCache(file)),
                None => Ok(None),
            };
        };
        Ok(Some(BinaryCacheConfig {
            destination: uri.parse()?,
            signing_key_file,
            compression,
        }))
    }
}

impl Settings {
    /// Each setting of `self`, or of `other` where `self` has none.
    pub fn or(self, other: Settings) -> Settings {
        Settings {
            database_url: self.database_url.or(other.database_url),
            data_dir: self.data_dir.or(other.data_dir),
            grpc_listen: self.grpc_listen.or(other.grpc_listen),
            http_listen: self.http_listen.or(other.http_listen),
            agent_token_file: self.agent_token_file.or(other.agent_token_file),
            store_socket: self.store_socket.or(other.store_socket),
            unsupported_grace_s: self.unsupported_grace_s.or(other.unsupported_grace_s),
            max_tries: self.max_tries.or(other.max_tries),
            retry_interval_s: self.retry_interval_s.or(other.retry_interval_s),
            max_log_bytes: self.max_log_bytes.or(other.max_log_bytes),
            max_output_bytes: self.max_output_bytes.or(other.max_output_bytes),
            shutdown_timeout_s: self.shutdown_timeout_s.or(other.shutdown_timeout_s),
            max_pending_writes: self.max_pending_writes.or(other.max_pending_writes),
            load_batch: self.load_batch.or(other.load_batch),
            lease_s: self.lease_s.or(other.lease_s),
            max_cpu_pressure: self.max_cpu_pressure.or(other.max_cpu_pressure),
            min_free_disk_mb: self.min_free_disk_mb.or(other.min_free_disk_mb),
            store_connections: self.store_connections.or(other.store_connections),
            transfer_connections: self.transfer_connections.or(other.transfer_connections),
            dispatch_order: self.dispatch_order.or(other.dispatch_order),
            binary_cache: self.binary_cache.or(other.binary_cache),
            signing_key_file: self.signing_key_file.or(other.signing_key_file),
            binary_cache_compression: self
                .binary_cache_compression
                .or(other.binary_cache_compression),
            status_interval_s: self.status_interval_s.or(other.status_interval_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_the_file_which_beats_defaults() {
        let file: Settings = toml::from_str(
            "data-dir = \"/srv/a\"\ngrpc-listen = \"0.0.0.0:7000\"\nagent-token-file = \"/etc/t\"\nmax-tries = 2\n",
        )
        .expect("valid TOML");
        let cli = Settings {
            data_dir: Some("/srv/b".into()),
            ..Settings::default()
        };
        let c = ServeConfig::resolve(file, cli).expect("resolves");
        assert_eq!(c.data_dir, PathBuf::from("/srv/b"));
        assert_eq!(c.grpc_listen.to_string(), "0.0.0.0:7000");
        assert_eq!(c.http_listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert_eq!(c.max_tries, 2);
        assert_eq!(c.agent_token_file, PathBuf::from("/etc/t"));
        assert!(c.database_url.is_none(), "no URL: the embedded database");
    }

    #[test]
    fn a_load_gets_its_two_store_connections() {
        let cli = Settings {
            agent_token_file: Some("/etc/t".into()),
            store_connections: Some(1),
            ..Settings::default()
        };
        let c = ServeConfig::resolve(Settings::default(), cli).expect("resolves");
        assert_eq!(c.store_connections, 2);
    }

    #[test]
    fn a_typo_in_the_file_is_an_error_not_ignored() {
        let err =
            toml::from_str::<Settings>("grpc-lisen = \"0.0.0.0:1\"").expect_err("unknown key");
        assert!(err.to_string().contains("grpc-lisen"), "{err}");
    }

    #[test]
    fn a_token_file_is_required() {
        let err = ServeConfig::resolve(Settings::default(), Settings::default())
            .expect_err("no token file");
        assert!(err.to_string().contains("--agent-token-file"), "{err}");
    }

    /// The long flag names of every setting, from the command line's
    /// definition (the same struct the file is read into).
    fn flag_names() -> std::collections::BTreeSet<String> {
        use clap::Args;
        Settings::augment_args(clap::Command::new("serve"))
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .collect()
    }

    const EXAMPLE: &str = include_str!("../../examples/sluice.toml");

    /// `key = value` with a kebab-case key: a setting, not prose.
    fn is_assignment(line: &str) -> bool {
        line.split_once(" = ").is_some_and(|(key, _)| {
            !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        })
    }

    #[test]
    fn the_example_file_documents_every_setting() {
        // Keys set, and keys shown commented out (`# key = value`).
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if is_assignment(rest) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let table: toml::Table = toml::from_str(&uncommented).expect("the example parses");
        let keys: std::collections::BTreeSet<String> = table.keys().cloned().collect();
        assert_eq!(keys, flag_names(), "examples/sluice.toml vs the flags");
        // Every key there is one `serve` accepts.
        toml::from_str::<Settings>(&uncommented).expect("every key is a setting");
    }

    #[test]
    fn the_example_files_values_are_the_defaults() {
        let example: Settings = toml::from_str(EXAMPLE).expect("the example parses");
        let example = ServeConfig::resolve(example, Settings::default()).expect("resolves");
        let defaults = ServeConfig::resolve(
            Settings {
                agent_token_file: Some("./agent-tokens".into()),
                ..Settings::default()
            },
            Settings::default(),
        )
        .expect("resolves");
        assert!(example.database_url.is_none() && example.store_socket.is_none());
        assert_eq!(example.grpc_listen, defaults.grpc_listen);
        assert_eq!(example.http_listen, defaults.http_listen);
        assert_eq!(example.unsupported_grace, defaults.unsupported_grace);
        assert_eq!(example.max_tries, defaults.max_tries);
        assert_eq!(example.retry_interval, defaults.retry_interval);
        assert_eq!(example.max_log_bytes, defaults.max_log_bytes);
        assert_eq!(example.max_output_bytes, defaults.max_output_bytes);
        assert_eq!(example.shutdown_timeout, defaults.shutdown_timeout);
        assert_eq!(example.max_pending_writes, defaults.max_pending_writes);
        assert_eq!(example.load_batch, defaults.load_batch);
        assert_eq!(example.status_interval, defaults.status_interval);
    }

    #[test]
    fn help_states_the_real_defaults_and_what_is_required() {
        use clap::Args;
        let d = ServeConfig::resolve(
            Settings {
                agent_token_file: Some("t".into()),
                ..Settings::default()
            },
            Settings::default(),
        )
        .expect("resolves");
        let expected = [
            ("data-dir", d.data_dir.display().to_string()),
            ("grpc-listen", d.grpc_listen.to_string()),
            ("http-listen", d.http_listen.to_string()),
            (
                "unsupported-grace-s",
                d.unsupported_grace.as_secs().to_string(),
            ),
            ("max-tries", d.max_tries.to_string()),
            ("retry-interval-s", d.retry_interval.as_secs().to_string()),
            ("max-log-bytes", d.max_log_bytes.to_string()),
            ("max-output-bytes", d.max_output_bytes.to_string()),
            (
                "shutdown-timeout-s",
                d.shutdown_timeout.as_secs().to_string(),
            ),
            ("max-pending-writes", d.max_pending_writes.to_string()),
            ("load-batch", d.load_batch.to_string()),
            ("lease-s", d.lease.as_secs().to_string()),
            ("max-cpu-pressure", d.max_cpu_pressure.to_string()),
            ("min-free-disk-mb", d.min_free_disk_mb.to_string()),
            (
                "binary-cache-compression",
                sluice_binary_cache::Compression::default().to_string(),
            ),
            ("status-interval-s", d.status_interval.as_secs().to_string()),
        ];
        let command = Settings::augment_args(clap::Command::new("serve"));
        let help = |long: &str| {
            command
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .and_then(|a| a.get_long_help().or(a.get_help()))
                .map(|h| {
                    h.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        for (long, default) in expected {
            let text = help(long);
            assert!(
                text.contains(&format!("[default: {default}]")),
                "--{long}: help says {text:?}, the default is {default}"
            );
        }
        assert!(help("agent-token-file").contains("Required"));
        assert!(help("database-url").contains("[default: none"));
        assert!(help("store-socket").contains("[default: none"));
        assert!(help("binary-cache").contains("[default: none"));
        assert!(help("signing-key-file").contains("[default: none"));
        assert!(d.binary_cache.is_none());
    }

    fn with_tokens(settings: Settings) -> Settings {
        Settings {
            agent_token_file: Some("t".into()),
            ..settings
        }
    }

    #[test]
    fn the_binary_cache_settings_merge_and_are_checked() {
        let file: Settings = toml::from_str(
            "binary-cache = \"s3://cache?region=eu-west-1\"\nsigning-key-file = \"/etc/key\"\nbinary-cache-compression = \"xz\"\n",
        )
        .expect("valid TOML");
        let cli = Settings {
            binary_cache_compression: Some("none".into()),
            ..Settings::default()
        };
        let c = ServeConfig::resolve(with_tokens(file), cli).expect("resolves");
        let cache = c.binary_cache.expect("a binary cache");
        assert_eq!(cache.destination.uri, "s3://cache?region=eu-west-1");
        assert_eq!(cache.signing_key_file, Some(PathBuf::from("/etc/key")));
        assert_eq!(cache.compression, sluice_binary_cache::Compression::None);

        let c = ServeConfig::resolve(
            with_tokens(Settings {
                binary_cache: Some("file:///srv/cache".into()),
                ..Settings::default()
            }),
            Settings::default(),
        )
        .expect("resolves");
        let cache = c.binary_cache.expect("a binary cache");
        assert_eq!(cache.compression, sluice_binary_cache::Compression::Zstd);
        assert!(cache.signing_key_file.is_none());

        let refused = |settings: Settings| {
            ServeConfig::resolve(with_tokens(settings), Settings::default())
                .expect_err("refused")
                .to_string()
        };
        let err = refused(Settings {
            binary_cache: Some("ftp://cache".into()),
            ..Settings::default()
        });
        assert!(
            err.contains("--binary-cache") && err.contains("ftp"),
            "{err}"
        );
        let err = refused(Settings {
            binary_cache: Some("file:///c".into()),
            binary_cache_compression: Some("gzip".into()),
            ..Settings::default()
        });
        assert!(err.contains("zstd, xz or none"), "{err}");
        let err = refused(Settings {
            signing_key_file: Some("/etc/key".into()),
            ..Settings::default()
        });
        assert!(err.contains("no --binary-cache"), "{err}");
    }
}
