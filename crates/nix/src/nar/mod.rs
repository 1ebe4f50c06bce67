//! NAR, the Nix ARchive: the canonical serialisation of a store path's file
//! tree, whose SHA-256 is a path's `narHash`.
//!
//! A NAR is a sequence of strings, each a little-endian `u64` length, the
//! bytes, and zero padding to a multiple of 8. After the magic
//! `nix-archive-1` comes one node:
//!
//! ```text
//! node = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
//!                   | "symlink" "target" <target>
//!                   | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"
//! ```
//!
//! Directory entries are sorted by the bytes of their names and unique.
//!
//! The pieces: [`NarEncoder`] serialises a filesystem path, streaming file
//! contents; [`NarDecoder`] is a pure, push-fed parser yielding [`NarEvent`]s;
//! [`NarRestorer`] writes events to the filesystem; [`HashingWriter`] and
//! [`HashingReader`] compute the NAR hash and size on the way; [`stream`]
//! adapts all of it to tokio.
//!
//! Invariants: memory is bounded whatever the archive's size. File contents
//! are never buffered whole (the encoder reads them in chunks, the decoder
//! hands out slices of its input); everything else the decoder keeps is
//! bounded by [`NarLimits`]. Malformed input gives a [`NarError`], never a
//! panic.

mod decode;
mod encode;
mod hashing;
mod restore;
pub mod stream;

pub use decode::{FeedError, NarDecoder, NarError, NarEvent, OwnedNarEvent};
pub use encode::{dump_path, NarEncodeError, NarEncoder};
pub use hashing::{HashingReader, HashingWriter, NarHasher, NarSummary};
pub use restore::{restore_path, NarRestoreError, NarRestorer, RestoreError};

/// The string every NAR starts with.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Bounds the decoder applies, so a hostile archive cannot make it allocate
/// or recurse without limit. The defaults are those of current Nix (2.35+),
/// which rejects archives beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarLimits {
    /// Longest directory entry name (Nix: 255, the Linux `NAME_MAX`).
    pub max_name_len: usize,
    /// Longest symlink target (Nix: 4095, `PATH_MAX` less the NUL).
    pub max_target_len: usize,
    /// Deepest directory nesting: a node inside this many directories is
    /// rejected (Nix: 64).
    pub max_depth: usize,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_name_len: 255,
            max_target_len: 4095,
            max_depth: 64,
        }
    }
}

/// Longest keyword (`(`, `type`, `executable`, …) the decoder reads before
/// deciding it is not the one expected; Nix uses the same bound.
pub(crate) const MAX_TAG_LEN: usize = 32;

/// Padding after `len` bytes of string data.
pub(crate) const fn padding(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Appends a NAR/daemon-protocol string to `out`.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(&[0u8; 8][..padding(s.len() as u64)]);
}

/// Whether `name` may name a directory entry: not empty, `.` or `..`, and
/// without `/` or NUL.
pub fn is_valid_entry_name(name: &[u8]) -> bool {
    !(name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0))
}

#[cfg(test)]
mod tests;
