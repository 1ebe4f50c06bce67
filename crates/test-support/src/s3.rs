//! An S3-compatible server for tests: moto's `moto_server` (from PyPI;
//! `scripts/install-deps.sh` installs it in a venv at [`MOTO_DIR`], and
//! `$SLUICE_MOTO_DIR` moves it), started on a free loopback port and
//! killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where `scripts/install-deps.sh` installs moto.
pub const MOTO_DIR: &str = "/opt/sluice-moto";

fn moto_server() -> PathBuf {
    let dir = std::env::var_os("SLUICE_MOTO_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MOTO_DIR));
    let path = dir.join("bin/moto_server");
    assert!(
        path.is_file(),
        "test harness: no S3-compatible server: {} is missing; install it with \
         scripts/install-deps.sh as root (a Python venv with PyPI's moto[s3] at {MOTO_DIR}, \
         or at $SLUICE_MOTO_DIR)",
        path.display()
    );
    path
}

/// A running moto server.
pub struct Moto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts one and waits (up to a minute) until it listens.
    pub fn start() -> Moto {
        let program = moto_server();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("test harness: a free port")
            .port();
        let dir = tempfile::tempdir().expect("test harness: a temporary directory");
        let log = std::fs::File::create(dir.path().join("moto.log"))
            .expect("test harness: moto's log file");
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("test harness: moto's log file"))
            .stderr(log)
            .spawn()
            .expect("test harness: starting moto_server");
        let moto = Moto {
            child,
            port,
            _dir: dir,
        };
        let up = crate::wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "moto_server did not listen on port {port} within 60 s");
        moto
    }

    /// Its endpoint, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket anyone may read, as Nix's HTTP binary cache store
    /// reads it (moto serves a public-read bucket's objects unsigned; on
    /// AWS that takes a bucket policy).
    pub fn create_public_bucket(&self, bucket: &str) {
        let out = Command::new("curl")
            .args(["-sf", "-X", "PUT", "-H", "x-amz-acl: public-read"])
            .arg(format!("{}/{bucket}", self.url()))
            .output()
            .expect("test harness: running curl");
        assert!(
            out.status.success(),
            "creating bucket {bucket}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes an AWS credentials file with profile `profile` (moto takes
    /// any keys) into `dir`; returns its path, for
    /// `AWS_SHARED_CREDENTIALS_FILE`.
    pub fn credentials_file(dir: &std::path::Path, profile: &str) -> PathBuf {
        let path = dir.join("credentials");
        std::fs::write(
            &path,
            format!("[{profile}]\naws_access_key_id = testing\naws_secret_access_key = testing\n"),
        )
        .expect("test harness: writing the credentials file");
        path
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
