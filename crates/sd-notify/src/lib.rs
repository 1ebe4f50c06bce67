//! systemd's readiness protocol, as `sd_notify(3)` describes it: a service
//! started with `Type=notify` tells the service manager it is ready
//! (`READY=1`), that it is shutting down (`STOPPING=1`), or how it is
//! doing (`STATUS=...`), in one datagram of newline-separated `KEY=VALUE`
//! lines sent to the Unix socket named by `$NOTIFY_SOCKET`.
//!
//! Both Sluice binaries use it; it is written here by hand (a
//! `UnixDatagram`, no libsystemd) because that is all there is to it.
//! `$NOTIFY_SOCKET` is a filesystem path (`/run/systemd/notify`) or, when
//! it starts with `@`, a name in Linux's abstract socket namespace.
//!
//! Invariants: without `$NOTIFY_SOCKET` (not started by systemd, or not as
//! `Type=notify`) nothing is sent and nothing fails; a message is sent
//! whole, in one datagram, or an error says why not. The variable is left
//! in the environment (removing it is unsound once threads run), so a
//! child that speaks the protocol itself must have it removed from its own
//! environment by whoever spawns it: systemd only listens to the main
//! process by default (`NotifyAccess=main`) and logs a warning for others.

use std::ffi::{OsStr, OsString};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The service is up: systemd finishes its start job, and units ordered
/// after it may start.
pub const READY: &str = "READY=1";
/// The service began to shut down (also on a signal systemd did not send).
pub const STOPPING: &str = "STOPPING=1";

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={socket:?}: not an absolute path or an @abstract name")]
    Unsupported { socket: OsString },
    #[error("NOTIFY_SOCKET={socket:?}: {source}")]
    Address {
        socket: OsString,
        source: std::io::Error,
    },
    #[error("sending {state:?} to NOTIFY_SOCKET={socket:?}: {source}")]
    Send {
        state: String,
        socket: OsString,
        source: std::io::Error,
    },
}

/// Sends `state` (one or more `KEY=VALUE` lines) to the service manager.
/// `Ok(false)`: `$NOTIFY_SOCKET` is unset or empty, nothing was sent.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    notify_via(std::env::var_os(NOTIFY_SOCKET).as_deref(), state)
}

/// [`notify`] with the value of `$NOTIFY_SOCKET` given (`None`: unset).
pub fn notify_via(socket: Option<&OsStr>, state: &str) -> Result<bool, NotifyError> {
    match socket {
        None => Ok(false),
        Some(s) if s.is_empty() => Ok(false),
        Some(s) => send(s, state).map(|()| true),
    }
}

/// The address a `$NOTIFY_SOCKET` value names.
fn address(socket: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = socket.as_bytes();
    let made = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket),
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
        // systemd also knows `vsock:` addresses (services in VMs); none
        // of ours runs so.
        _ => {
            return Err(NotifyError::Unsupported {
                socket: socket.to_owned(),
            })
        }
    };
    made.map_err(|source| NotifyError::Address {
        socket: socket.to_owned(),
        source,
    })
}

fn send(socket: &OsStr, state: &str) -> Result<(), NotifyError> {
    let addr = address(socket)?;
    let failed = |source| NotifyError::Send {
        state: state.to_owned(),
        socket: socket.to_owned(),
        source,
    };
    let datagram = UnixDatagram::unbound().map_err(failed)?;
    let sent = datagram
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(failed)?;
    if sent != state.len() {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes", state.len()),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Receives one datagram, or fails after a few seconds.
    fn receive(listener: &UnixDatagram) -> String {
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = listener.recv(&mut buf).expect("a datagram arrives");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn a_path_socket_receives_the_message_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let state = format!("{READY}\nSTATUS=listening on 127.0.0.1:50051");
        let sent = notify_via(Some(path.as_os_str()), &state).expect("sent");
        assert!(sent);
        assert_eq!(receive(&listener), state);
        notify_via(Some(path.as_os_str()), STOPPING).expect("sent");
        assert_eq!(receive(&listener), "STOPPING=1");
    }

    #[test]
    fn an_abstract_socket_is_named_after_its_at_sign() {
        let name = format!("sluice-sd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind");
        let value = OsString::from(format!("@{name}"));
        assert!(notify_via(Some(&value), READY).expect("sent"));
        assert_eq!(receive(&listener), READY);
    }

    #[test]
    fn without_a_socket_nothing_is_sent_and_nothing_fails() {
        assert!(!notify_via(None, READY).expect("no-op"));
        assert!(!notify_via(Some(OsStr::new("")), READY).expect("no-op"));
    }

    #[test]
    fn a_socket_nobody_listens_on_or_a_bad_name_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("nobody");
        let err = notify_via(Some(gone.as_os_str()), READY).expect_err("no listener");
        assert!(matches!(err, NotifyError::Send { .. }), "{err}");
        assert!(err.to_string().contains("nobody"), "{err}");
        let err = notify_via(Some(OsStr::new("run/notify")), READY).expect_err("relative");
        assert!(matches!(err, NotifyError::Unsupported { .. }), "{err}");
    }
}
