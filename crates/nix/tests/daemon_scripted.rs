//! The client against a scripted peer, for what the real Nix 2.8 and 2.26
//! daemons of the other tests cannot show: a feature actually negotiated
//! in the 1.38 handshake, realisations by `.drv` path, protocol 1.35,
//! refusal of old or foreign peers, and what happens when the data to
//! upload fails half-way. The script's bytes follow
//! Nix's sources (`worker-protocol-connection.cc`, `daemon.cc`); it checks
//! what the client sends byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::task::{Context, Poll};

use sluice_nix::daemon::client::ConnectOptions;
use sluice_nix::daemon::handshake::{WORKER_MAGIC_1, WORKER_MAGIC_2};
use sluice_nix::daemon::stderr::{STDERR_LAST, STDERR_NEXT};
use sluice_nix::daemon::wire::WireWriter;
use sluice_nix::daemon::{
    ClientError, DaemonClient, DrvOutput, HandshakeError, LogEvent, PathInfo, ProtocolVersion,
    Realisation, Trust,
};
use sluice_nix::hash::Hash;
use sluice_nix::store_path::{StoreDir, StorePath};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};

/// The daemon's end of the connection.
struct Peer(DuplexStream);

impl Peer {
    async fn expect(&mut self, w: &WireWriter, what: &str) {
        let mut got = vec![0u8; w.as_bytes().len()];
        self.0
            .read_exact(&mut got)
            .await
            .expect("the client sent enough");
        assert_eq!(got, w.as_bytes(), "client sent unexpected bytes for {what}");
    }

    async fn send(&mut self, w: &WireWriter) {
        self.0
            .write_all(w.as_bytes())
            .await
            .expect("sending to the client");
    }

    /// The daemon's side of the handshake, announcing `version` and
    /// `features` (sent only from 1.38).
    async fn handshake(&mut self, version: u64, features: &[&str]) {
        let mut hello = WireWriter::new();
        hello
            .u64(WORKER_MAGIC_1)
            .u64(ProtocolVersion::LATEST.to_wire());
        self.expect(&hello, "hello").await;
        let mut reply = WireWriter::new();
        reply.u64(WORKER_MAGIC_2).u64(version);
        self.send(&reply).await;
        if version >= 0x126 {
            let mut ours = WireWriter::new();
            ours.strings(["realisation-with-path-not-hash"]);
            self.expect(&ours, "client features").await;
            let mut theirs = WireWriter::new();
            theirs.strings(features.iter());
            self.send(&theirs).await;
        }
        let mut info = WireWriter::new();
        info.u64(0).u64(0);
        self.expect(&info, "cpu affinity and reserve space").await;
        let mut reply = WireWriter::new();
        reply.str("2.99.0-scripted");
        if version >= 0x123 {
            reply.u64(1);
        }
        reply.u64(STDERR_LAST);
        self.send(&reply).await;
    }
}

fn pair() -> (DuplexStream, Peer) {
    let (client, daemon) = tokio::io::duplex(1 << 16);
    (client, Peer(daemon))
}

async fn client_on(stream: DuplexStream) -> Result<DaemonClient, ClientError> {
    let (r, w) = tokio::io::split(stream);
    DaemonClient::from_stream(r, w, ConnectOptions::default()).await
}

fn path(name: &str) -> StorePath {
    StorePath::from_base_name(&format!("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-{name}")).expect("valid")
}

#[tokio::test]
async fn protocol_1_38_with_realisations_by_path() {
    let (stream, mut peer) = pair();
    let dir = StoreDir::default();
    let drv = path("foo.drv");
    let out = path("foo");
    let script = tokio::spawn({
        let (dir, drv, out) = (dir.clone(), drv.clone(), out.clone());
        async move {
            // A newer daemon offers 1.39 and a feature we do not know.
            peer.handshake(0x127, &["realisation-with-path-not-hash", "something-else"])
                .await;
            let mut query = WireWriter::new();
            query.u64(43).store_path(&dir, &drv).str("out");
            peer.expect(&query, "queryRealisation").await;
            let mut reply = WireWriter::new();
            reply
                .u64(STDERR_NEXT)
                .str("looking it up\n")
                .u64(STDERR_LAST);
            reply.u64(1).store_path(&dir, &out).strings(["key:c2ln"]);
            peer.send(&reply).await;

            let mut register = WireWriter::new();
            register
                .u64(42)
                .store_path(&dir, &drv)
                .str("out")
                .store_path(&dir, &out)
                .strings(["key:c2ln"]);
            peer.expect(&register, "registerDrvOutput").await;
            let mut reply = WireWriter::new();
            reply.u64(STDERR_LAST);
            peer.send(&reply).await;
            peer
        }
    });
    let mut client = client_on(stream).await.expect("handshake at 1.38");
    let info = client.info().clone();
    assert_eq!(info.version, ProtocolVersion::new(1, 38));
    assert_eq!(info.daemon_version, ProtocolVersion::new(1, 39));
    assert_eq!(
        info.features,
        BTreeSet::from(["realisation-with-path-not-hash".to_owned()])
    );
    assert_eq!(info.trust, Some(Trust::Trusted));
    assert_eq!(info.nix_version.as_deref(), Some("2.99.0-scripted"));
    assert!(client.realisations_by_path());

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    client.log_to(tx);
    let id = DrvOutput::ByPath {
        drv_path: drv.clone(),
        output: "out".into(),
    };
    let by_hash = DrvOutput::ByHash {
        drv_hash: Hash::sha256(b"x"),
        output: "out".into(),
    };
    let err = client
        .query_realisation(&by_hash)
        .await
        .expect_err("a hash id cannot be sent");
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err:?}");
    let real = client
        .query_realisation(&id)
        .await
        .expect("queryRealisation")
        .expect("found");
    assert_eq!(real.out_path, out);
    assert_eq!(real.signatures, BTreeSet::from(["key:c2ln".to_owned()]));
    assert_eq!(
        rx.try_recv().ok(),
        Some(LogEvent::Message("looking it up".into()))
    );
    client
        .register_drv_output(&Realisation {
            id,
            out_path: out,
            signatures: BTreeSet::from(["key:c2ln".to_owned()]),
            dependent_realisations: BTreeMap::new(),
        })
        .await
        .expect("registerDrvOutput");
    script.await.expect("the script ran to its end");
}

#[tokio::test]
async fn protocol_1_35_has_trust_but_no_features() {
    let (stream, mut peer) = pair();
    let script = tokio::spawn(async move {
        peer.handshake(0x123, &[]).await;
        peer
    });
    let client = client_on(stream).await.expect("handshake at 1.35");
    assert_eq!(client.version(), ProtocolVersion::new(1, 35));
    assert_eq!(client.info().trust, Some(Trust::Trusted));
    assert!(client.info().features.is_empty());
    assert!(!client.realisations_by_path());
    script.await.expect("the script ran to its end");
}

#[tokio::test]
async fn old_and_foreign_peers_are_refused() {
    for (magic, version, expected) in [
        (
            WORKER_MAGIC_2,
            0x121u64,
            HandshakeError::TooOld(ProtocolVersion::new(1, 33)),
        ),
        (WORKER_MAGIC_2, 0x200, HandshakeError::UnsupportedMajor(2)),
        (0x1234, 0x126, HandshakeError::BadMagic(0x1234)),
    ] {
        let (stream, mut peer) = pair();
        let script = tokio::spawn(async move {
            let mut hello = WireWriter::new();
            hello
                .u64(WORKER_MAGIC_1)
                .u64(ProtocolVersion::LATEST.to_wire());
            peer.expect(&hello, "hello").await;
            let mut reply = WireWriter::new();
            reply.u64(magic).u64(version);
            peer.send(&reply).await;
            peer
        });
        match client_on(stream).await {
            Err(ClientError::Handshake(e)) => assert_eq!(e, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
        script.await.expect("the script ran");
    }
}

/// Yields `good` bytes, then fails.
struct FailingReader {
    good: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.good == 0 {
            return Poll::Ready(Err(std::io::Error::other("disk on fire")));
        }
        let n = self.good.min(buf.remaining());
        buf.put_slice(&vec![0xab; n]);
        self.good -= n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failing_upload_closes_the_connection() {
    let (stream, mut peer) = pair();
    let script = tokio::spawn(async move {
        peer.handshake(0x122, &[]).await;
        // Swallow whatever the client sends until it hangs up.
        let mut sink = Vec::new();
        let _ = peer.0.read_to_end(&mut sink).await;
        sink
    });
    let mut client = client_on(stream).await.expect("handshake at 1.34");
    let info = PathInfo::new(path("up"), Hash::sha256(b""), 100_000);
    let err = client
        .add_to_store_nar(&info, &mut FailingReader { good: 70_000 }, false, true)
        .await
        .expect_err("the source fails");
    assert!(matches!(err, ClientError::Source { .. }), "{err:?}");
    assert!(!client.is_open());
    drop(client);
    let sent = script.await.expect("the script ran");
    // The header, then one full frame: never the terminating empty frame
    // that would make the daemon accept a truncated NAR.
    assert!(sent.len() > 64 * 1024);
    assert_ne!(&sent[sent.len() - 8..], &0u64.to_le_bytes());
}
