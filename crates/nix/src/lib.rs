//! Nix's on-disk and on-wire formats, and a client for the Nix daemon.
//!
//! The codecs are pure: they decode from byte buffers and encode into them,
//! and never touch a socket or a file descriptor. IO lives at three named
//! edges only: the async layer of the daemon client (`daemon::client` and
//! its connection), which moves bytes between a socket or pipe and the
//! codecs; the NAR encoder and restorer ([`nar::NarEncoder`],
//! [`nar::NarRestorer`]), which read and write the filesystem tree being
//! archived; and their tokio adaptors in [`nar::stream`].
//!
//! Exactness is the contract: a path, hash or `.drv` that differs from
//! Nix's by one byte is a bug.

pub mod base32;
pub mod daemon;
pub mod derivation;
pub mod hash;
pub mod nar;
pub mod store_path;
