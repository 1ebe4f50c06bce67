//! Properties of the worker-protocol decoders: no input makes them panic or
//! wait for more than a lying length allows, every prefix of a valid message
//! asks for more bytes (never "malformed"), and encode/decode round-trip.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use sluice_nix::daemon::stderr::{self, StderrMessage};
use sluice_nix::daemon::wire::{DecodeError, Limits, WireReader, WireWriter};
use sluice_nix::daemon::{
    handshake, BuildResult, BuildStatus, BuiltOutput, DerivedPath, DrvOutput, KeyedBuildResult,
    OutputsSpec, PathInfo, ProtocolVersion, Realisation, WireContext,
};
use sluice_nix::hash::Hash;
use sluice_nix::store_path::{StoreDir, StorePath};

fn contexts() -> Vec<WireContext> {
    [
        (34, false),
        (35, false),
        (37, false),
        (38, false),
        (38, true),
    ]
    .into_iter()
    .map(|(minor, with_path)| WireContext {
        version: ProtocolVersion::new(1, minor),
        realisation_with_path: with_path,
        store_dir: StoreDir::default(),
    })
    .collect()
}

fn limits() -> Limits {
    Limits {
        max_string: 4096,
        max_list: 64,
    }
}

/// Runs `f` on `bytes` and checks the invariants of any decode outcome.
fn check<T>(bytes: &[u8], f: impl FnOnce(&mut WireReader<'_>) -> Result<T, DecodeError>) {
    let mut r = WireReader::new(bytes, limits());
    match f(&mut r) {
        Ok(_) => assert!(r.position() <= bytes.len()),
        Err(DecodeError::NeedMore { needed }) => {
            assert!(
                needed > bytes.len(),
                "asks for {needed} bytes with {} present",
                bytes.len()
            );
            // A lying length may not make us wait for more than one
            // string beyond what is there.
            assert!(
                needed <= bytes.len() + 8 + limits().max_string + 8,
                "asks for {needed} bytes"
            );
        }
        Err(DecodeError::Malformed(_)) => {}
    }
}

fn every_decoder(bytes: &[u8]) {
    let dir = StoreDir::default();
    check(bytes, stderr::decode);
    check(bytes, handshake::decode_daemon_hello);
    check(bytes, handshake::decode_features);
    check(bytes, |r| PathInfo::decode_keyed(r, &dir));
    for ctx in contexts() {
        check(bytes, |r| handshake::decode_daemon_info(r, ctx.version));
        check(bytes, |r| BuildResult::decode(r, &ctx));
        check(bytes, |r| KeyedBuildResult::decode_list(r, &ctx));
        let id = if ctx.realisation_with_path {
            DrvOutput::ByPath {
                drv_path: path("x.drv"),
                output: "out".into(),
            }
        } else {
            DrvOutput::ByHash {
                drv_hash: Hash::sha256(b"x"),
                output: "out".into(),
            }
        };
        check(bytes, |r| Realisation::decode_query_reply(r, &ctx, &id));
    }
}

fn path(name: &str) -> StorePath {
    StorePath::from_base_name(&format!("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-{name}")).expect("valid")
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (vec(0usize..32, 32), "[a-z][a-z0-9.-]{0,10}").prop_map(|(digits, name)| {
        let hash: String = digits
            .into_iter()
            .map(|d| sluice_nix::base32::ALPHABET[d] as char)
            .collect();
        StorePath::from_base_name(&format!("{hash}-{name}")).expect("valid store path")
    })
}

fn status() -> impl Strategy<Value = BuildStatus> {
    (0u64..20).prop_map(BuildStatus::from_wire)
}

fn build_result(ctx: &WireContext) -> impl Strategy<Value = BuildResult> {
    let v = ctx.version;
    let with_path = ctx.realisation_with_path;
    (
        status(),
        "[ -~]{0,40}",
        (0u64..5, any::<bool>(), 0u64..1 << 40, 0u64..1 << 40),
        (
            proptest::option::of(0u64..1 << 40),
            proptest::option::of(0u64..1 << 40),
        ),
        btree_map(
            "[a-z]{1,5}",
            (
                store_path(),
                btree_set("[a-z]{1,8}:[A-Za-z0-9+/=]{4,12}", 0..3),
            ),
            0..4,
        ),
    )
        .prop_map(
            move |(status, error_msg, (times_built, nondet, start, stop), (cu, cs), outs)| {
                let new = v >= ProtocolVersion::new(1, 29);
                let cpu = v >= ProtocolVersion::new(1, 37);
                BuildResult {
                    status,
                    error_msg,
                    times_built: if new { times_built } else { 0 },
                    is_non_deterministic: new && nondet,
                    start_time: if new { start } else { 0 },
                    stop_time: if new { stop } else { 0 },
                    cpu_user: cu.filter(|_| cpu).map(Duration::from_micros),
                    cpu_system: cs.filter(|_| cpu).map(Duration::from_micros),
                    built_outputs: outs
                        .into_iter()
                        .map(|(name, (out_path, sigs))| {
                            let legacy_id =
                                (!with_path).then(|| format!("sha256:{}!{name}", "0".repeat(64)));
                            let signatures = if with_path { sigs } else { BTreeSet::new() };
                            (
                                name,
                                BuiltOutput {
                                    out_path,
                                    signatures,
                                    legacy_id,
                                },
                            )
                        })
                        .collect(),
                }
            },
        )
}

/// Every strict prefix needs more bytes; the whole decodes to `expected`.
fn prefixes_need_more<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    expected: &T,
    f: impl Fn(&mut WireReader<'_>) -> Result<T, DecodeError>,
) -> Result<(), TestCaseError> {
    for len in 0..bytes.len() {
        match f(&mut WireReader::new(&bytes[..len], Limits::default())) {
            Err(DecodeError::NeedMore { needed }) => {
                prop_assert!(
                    needed > len && needed <= bytes.len(),
                    "prefix {len}: needed {needed}"
                );
            }
            other => prop_assert!(false, "prefix {len} of {}: {other:?}", bytes.len()),
        }
    }
    let mut r = WireReader::new(bytes, Limits::default());
    let decoded = f(&mut r);
    prop_assert_eq!(decoded.as_ref(), Ok(expected));
    prop_assert_eq!(r.position(), bytes.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
        every_decoder(&bytes);
    }

    #[test]
    fn arbitrary_words_never_panic(words in vec(prop_oneof![
        0u64..20,
        Just(stderr::STDERR_NEXT), Just(stderr::STDERR_ERROR), Just(stderr::STDERR_RESULT),
        Just(stderr::STDERR_START_ACTIVITY), Just(handshake::WORKER_MAGIC_2), Just(0x126),
        any::<u64>(),
    ], 0..40)) {
        // Plausible lengths and tags reach deeper into the decoders than
        // random bytes do.
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        every_decoder(&bytes);
    }

    #[test]
    fn build_results_round_trip_and_prefixes_need_more(
        (ctx, result) in prop::sample::select(contexts()).prop_flat_map(|ctx| {
            let s = build_result(&ctx);
            (Just(ctx), s)
        })
    ) {
        let mut w = WireWriter::new();
        result.encode(&mut w, &ctx);
        prefixes_need_more(w.as_bytes(), &result, |r| BuildResult::decode(r, &ctx))?;
        let keyed = KeyedBuildResult {
            path: DerivedPath::Built { drv_path: path("k.drv"), outputs: OutputsSpec::All },
            result: result.clone(),
        };
        let mut w = WireWriter::new();
        w.u64(1);
        keyed.encode(&mut w, &ctx);
        prefixes_need_more(w.as_bytes(), &vec![keyed], |r| KeyedBuildResult::decode_list(r, &ctx))?;
    }

    #[test]
    fn path_infos_round_trip_and_prefixes_need_more(
        p in store_path(),
        deriver in proptest::option::of(store_path()),
        refs in btree_set(store_path(), 0..4),
        digest in any::<[u8; 32]>(),
        (time, size, ultimate) in (0u64..1 << 40, any::<u64>(), any::<bool>()),
        sigs in btree_set("[a-z]{1,8}:[A-Za-z0-9+/=]{4,12}", 0..3),
        ca in proptest::option::of("(fixed:r:sha256|text:sha256):[0-9a-z]{52}"),
    ) {
        let dir = StoreDir::default();
        let info = PathInfo {
            path: p.clone(),
            deriver,
            nar_hash: Hash::from_digest(sluice_nix::hash::HashAlgo::Sha256, &digest).expect("32 bytes"),
            references: refs,
            registration_time: time,
            nar_size: size,
            ultimate,
            sigs,
            ca,
        };
        let mut w = WireWriter::new();
        w.store_path(&dir, &p);
        info.encode_unkeyed(&mut w, &dir);
        prefixes_need_more(w.as_bytes(), &info, |r| PathInfo::decode_keyed(r, &dir))?;
    }

    #[test]
    fn realisations_round_trip(out in store_path(), drv in store_path(), digest in any::<[u8; 32]>(),
                               sigs in btree_set("[a-z]{1,8}:[A-Za-z0-9+/=]{4,12}", 0..3),
                               deps in btree_map("sha256:[0-9a-f]{64}![a-z]{1,4}", store_path(), 0..3)) {
        for ctx in contexts() {
            let id = if ctx.realisation_with_path {
                DrvOutput::ByPath { drv_path: drv.clone(), output: "out".into() }
            } else {
                DrvOutput::ByHash {
                    drv_hash: Hash::from_digest(sluice_nix::hash::HashAlgo::Sha256, &digest).expect("32 bytes"),
                    output: "out".into(),
                }
            };
            let real = Realisation {
                id: id.clone(),
                out_path: out.clone(),
                signatures: sigs.clone(),
                dependent_realisations: if ctx.realisation_with_path { BTreeMap::new() } else { deps.clone() },
            };
            // What RegisterDrvOutput sends is what QueryRealisation returns.
            let mut sent = WireWriter::new();
            prop_assert!(real.encode(&mut sent, &ctx).is_some());
            let mut reply = WireWriter::new();
            if ctx.realisation_with_path {
                // An optional: tag, then the fields after the id.
                let mut id_only = WireWriter::new();
                id.encode(&mut id_only, &ctx).expect("encodable");
                reply.u64(1);
                let rest = &sent.as_bytes()[id_only.as_bytes().len()..];
                let mut bytes = reply.into_bytes();
                bytes.extend_from_slice(rest);
                prefixes_need_more(&bytes, &Some(real.clone()), |r| Realisation::decode_query_reply(r, &ctx, &id))?;
            } else {
                // A set of JSON strings.
                reply.u64(1);
                let mut bytes = reply.into_bytes();
                bytes.extend_from_slice(sent.as_bytes());
                prefixes_need_more(&bytes, &Some(real.clone()), |r| Realisation::decode_query_reply(r, &ctx, &id))?;
            }
        }
    }

    #[test]
    fn lying_lengths_are_refused_at_once(len in (4097u64..u64::MAX), code in prop::sample::select(vec![
        stderr::STDERR_NEXT, stderr::STDERR_WRITE,
    ])) {
        let mut w = WireWriter::new();
        w.u64(code).u64(len);
        let bytes = w.into_bytes();
        let result = stderr::decode(&mut WireReader::new(&bytes, limits()));
        prop_assert!(matches!(result, Err(DecodeError::Malformed(_))), "{result:?}");
    }
}

#[test]
fn stderr_messages_decode_whole_or_not_at_all() {
    let mut w = WireWriter::new();
    w.u64(stderr::STDERR_START_ACTIVITY)
        .u64(42)
        .u64(3)
        .u64(stderr::ACTIVITY_BUILD)
        .str("building '/nix/store/x.drv'")
        .u64(2)
        .u64(1)
        .str("/nix/store/x.drv")
        .u64(0)
        .u64(1)
        .u64(0);
    let bytes = w.into_bytes();
    for len in 0..bytes.len() {
        assert!(matches!(
            stderr::decode(&mut WireReader::new(&bytes[..len], Limits::default())),
            Err(DecodeError::NeedMore { .. })
        ));
    }
    let msg = stderr::decode(&mut WireReader::new(&bytes, Limits::default())).expect("decodes");
    assert!(matches!(
        msg,
        StderrMessage::Log(sluice_nix::daemon::LogEvent::StartActivity { id: 42, .. })
    ));
}
