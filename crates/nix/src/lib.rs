//! Nix's on-disk and on-wire formats, and a client for the Nix daemon.
//!
//! Codecs decode from byte buffers and encode into them; only the daemon
//! client's thin async layer does IO.
