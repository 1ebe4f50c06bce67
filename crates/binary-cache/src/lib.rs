//! Uploads store paths to a Nix binary cache, signed, the way Nix itself
//! writes one, so that any Nix can substitute from it.
//!
//! - [`Destination`]: the cache's URI (`file:///dir`, `s3://bucket?…`),
//!   opened as an `object_store` store.
//! - [`SecretKey`]: a Nix signing key file; [`NarInfo`]: `.narinfo` files
//!   and the fingerprint their `Sig:` signs.
//! - [`BinaryCache`]: [`BinaryCache::upload_closure`] uploads paths with
//!   their closures minus what the cache has, NARs compressed
//!   ([`Compression`]: zstd, xz or none) and `.narinfo`s written
//!   dependencies first; [`BinaryCache::upload_log`] uploads a build log
//!   as `log/<drv>`. Paths come from a [`NarSource`] (the queue runner's
//!   store; [`DaemonNarSource`], a daemon's socket).
//!
//! Invariant: a `.narinfo` is written only once its NAR and the
//! `.narinfo`s of its whole closure are in the cache, so the cache never
//! advertises a path a client cannot fetch entirely.

mod cache;
mod compression;
mod destination;
mod key;
mod log;
mod narinfo;
mod retry;
mod source;
mod upload;

pub use cache::{
    BinaryCache, CacheConfig, CacheError, CacheInfoError, KNOWN_PATHS, PARTS_IN_FLIGHT, PART_SIZE,
    WHOLE_PUT_LIMIT,
};
pub use compression::{Compression, UnknownCompression};
pub use destination::{AddressingStyle, Destination, DestinationError, Location, S3Destination};
pub use key::{KeyError, PublicKey, SecretKey};
pub use log::LogUploadError;
pub use narinfo::{fingerprint, nar_key, narinfo_key, NarInfo};
pub use retry::RetryPolicy;
pub use source::{daemon_nar, daemon_path_infos, DaemonNarSource, NarSource, SourceError};
pub use upload::{UploadError, UploadReport};

/// `object_store`, as this crate uses it (for callers that hand
/// [`BinaryCache::with_objects`] a store of their own).
pub use object_store;
