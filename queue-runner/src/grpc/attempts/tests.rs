//! Ownership and output checks of the attempt registry, on derivations
//! built by hand (no store involved).

use std::collections::BTreeSet;

use sluice_core::MachineId;
use sluice_nix::daemon::PathInfo;
use sluice_nix::derivation::{Derivation, DerivationOutput};
use sluice_nix::hash::{Hash, HashAlgo};
use sluice_nix::store_path::{ContentAddressMethod, StoreDir, StorePath};

use super::{AccessError, AttemptEntry, Attempts, LogHandle, OutputError, Report, UploadedOutput};
use crate::agents::{Assignment, AttemptId, PathSummary};
use crate::logs::LogWriter;

const INPUT: &str = "/nix/store/7n8pyd8s1sxgxhcw6xm9f5cbqqzk3c8p-input";
const OUT: &str = "/nix/store/1f0xy7krxh1hbbi2pvdq8cp5bjq6vqq3-demo";
const OTHER: &str = "/nix/store/2f0xy7krxh1hbbi2pvdq8cp5bjq6vqq3-elsewhere";

fn id(n: u128) -> AttemptId {
    AttemptId(uuid::Uuid::from_u128(n))
}

fn path(p: &str) -> StorePath {
    StoreDir::default().parse_path(p).expect("test path")
}

fn assignment(outputs: Vec<(&str, DerivationOutput)>) -> Assignment {
    let drv = Derivation {
        name: "demo".into(),
        outputs: outputs
            .into_iter()
            .map(|(n, o)| (n.to_owned(), o))
            .collect(),
        input_srcs: [path(INPUT)].into(),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        ..Derivation::default()
    };
    let dir = StoreDir::default();
    Assignment {
        attempt: id(1),
        drv_path: dir.print(&drv.drv_path(&dir).expect("drv path")),
        basic_drv: drv.to_aterm(&dir).expect("aterm"),
        inputs: vec![PathSummary {
            path: INPUT.into(),
            nar_hash: String::new(),
            nar_size: 0,
            references: vec![],
            deriver: None,
            ca: None,
        }],
        max_silent_time_s: 0,
        build_timeout_s: 0,
        max_log_bytes: 10,
        max_output_bytes: 1000,
        streamed_inputs: None,
    }
}

/// The input closure's members an upload refers to, as the service
/// computes them.
fn inputs() -> BTreeSet<StorePath> {
    [path(INPUT)].into()
}

fn input_addressed() -> Assignment {
    assignment(vec![(
        "out",
        DerivationOutput::InputAddressed { path: path(OUT) },
    )])
}

fn info(p: &str, size: u64, refs: &[&str]) -> PathInfo {
    let mut info = PathInfo::new(path(p), Hash::sha256(b"x"), size);
    info.references = refs.iter().map(|r| path(r)).collect::<BTreeSet<_>>();
    info
}

#[test]
fn only_the_owner_may_touch_an_attempt_and_only_once_it_is_reported() {
    let attempts = Attempts::new();
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    attempts.register(id(1), entry.clone()).expect("register");
    assert!(attempts.register(id(1), entry).is_err());
    assert_eq!(
        attempts.with_owned(id(1), MachineId(2), |_| ()),
        Err(AccessError::NotYours(id(1)))
    );
    assert_eq!(
        attempts.with_owned(id(9), MachineId(1), |_| ()),
        Err(AccessError::Unknown(id(9)))
    );
    let Ok(Report::First { committed, wait }) = attempts.report(id(1), MachineId(1)) else {
        panic!("the first report is the first");
    };
    // Once reported, nothing more may be uploaded or streamed, and a second
    // report waits for the first one's commit.
    assert_eq!(
        attempts.with_owned(id(1), MachineId(1), |_| ()),
        Err(AccessError::Reported(id(1)))
    );
    let Ok(Report::Again(again)) = attempts.report(id(1), MachineId(1)) else {
        panic!("a second report waits for the first");
    };
    assert!(!*again.borrow());
    committed.send(true).expect("a receiver is alive");
    assert!(*again.borrow() && *wait.borrow());
    assert_eq!(attempts.remove_machine(MachineId(1)), vec![id(1)]);
    assert!(attempts.is_empty());
}

#[test]
fn attempts_expected_after_a_restart_are_waited_for_not_refused() {
    let attempts = Attempts::new();
    attempts.expect([id(5)]);
    assert_eq!(
        attempts.with_owned(id(5), MachineId(1), |_| ()),
        Err(AccessError::Resuming(id(5)))
    );
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    attempts.register_adopted(id(5), entry).expect("register");
    assert_eq!(attempts.with_owned(id(5), MachineId(1), |_| ()), Ok(()));
    assert!(matches!(
        attempts.take_log(id(5), MachineId(1)),
        Ok(Some(LogHandle::Create { append: true, .. }))
    ));
    attempts.expect([id(6)]);
    attempts.remove(id(6));
    assert_eq!(
        attempts.with_owned(id(6), MachineId(1), |_| ()),
        Err(AccessError::Unknown(id(6)))
    );
}

#[test]
fn uploads_must_be_the_expected_path_with_known_references_and_within_the_size_limit() {
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    assert_eq!(
        entry.check_upload("out", &info(OUT, 10, &[INPUT, OUT]), &inputs()),
        Ok(())
    );
    assert!(matches!(
        entry.check_upload("dev", &info(OUT, 10, &[]), &inputs()),
        Err(OutputError::NoSuchOutput(_))
    ));
    assert!(matches!(
        entry.check_upload("out", &info(OTHER, 10, &[]), &inputs()),
        Err(OutputError::WrongPath { .. })
    ));
    assert!(matches!(
        entry.check_upload("out", &info(OUT, 10, &[OTHER]), &inputs()),
        Err(OutputError::StrayReference { .. })
    ));
    assert!(matches!(
        entry.check_upload("out", &info(OUT, 1001, &[]), &inputs()),
        Err(OutputError::TooLarge { .. })
    ));
}

#[test]
fn a_floating_output_must_be_its_own_content_address() {
    let a = assignment(vec![(
        "out",
        DerivationOutput::CAFloating {
            method: ContentAddressMethod::Recursive,
            hash_algo: HashAlgo::Sha256,
        },
    )]);
    let entry = AttemptEntry::from_assignment(MachineId(1), &a).expect("entry");
    let hash = Hash::sha256(b"contents");
    let dir = StoreDir::default();
    let refs: BTreeSet<StorePath> = [path(INPUT)].into();
    let good = dir
        .make_fixed_output_path(ContentAddressMethod::Recursive, &hash, "demo", &refs, false)
        .expect("ca path");
    let mut up = PathInfo::new(good.clone(), Hash::sha256(b"nar"), 5);
    up.references = refs;
    up.ca = Some(format!("fixed:r:sha256:{}", hash.to_nix32()));
    assert_eq!(entry.check_upload("out", &up, &inputs()), Ok(()));

    let mut lying = up.clone();
    lying.ca = Some(format!(
        "fixed:r:sha256:{}",
        Hash::sha256(b"other").to_nix32()
    ));
    assert!(matches!(
        entry.check_upload("out", &lying, &inputs()),
        Err(OutputError::BadContentAddress { .. })
    ));
    let mut flat = up.clone();
    flat.ca = Some(format!("fixed:sha256:{}", hash.to_nix32()));
    assert!(entry.check_upload("out", &flat, &inputs()).is_err());
    let mut none = up.clone();
    none.ca = None;
    assert!(entry.check_upload("out", &none, &inputs()).is_err());

    // A success needs the upload on record.
    let reported = vec![("out".to_owned(), dir.print(&good))];
    assert_eq!(
        entry.check_success(&reported),
        Err(OutputError::NotUploaded("out".into()))
    );
    let attempts = Attempts::new();
    attempts.register(id(1), entry).expect("register");
    attempts
        .record_upload(
            id(1),
            MachineId(1),
            "out",
            UploadedOutput {
                path: good.clone(),
                nar_hash: up.nar_hash,
                nar_size: 5,
            },
        )
        .expect("record");
    let entry = attempts.get(id(1)).expect("entry");
    assert_eq!(entry.check_success(&reported), Ok(vec![good]));
}

#[test]
fn a_success_must_name_exactly_the_derivations_outputs() {
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    assert_eq!(
        entry.check_success(&[("out".into(), OUT.into())]),
        Ok(vec![path(OUT)])
    );
    assert!(entry.check_success(&[]).is_err());
    assert!(entry
        .check_success(&[("out".into(), OUT.into()), ("out".into(), OUT.into())])
        .is_err());
    assert!(entry
        .check_success(&[("out".into(), OTHER.into())])
        .is_err());
}

#[tokio::test]
async fn one_log_stream_at_a_time_and_a_later_one_resumes() {
    let attempts = Attempts::new();
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    let drv = entry.drv_path().clone();
    attempts.register(id(1), entry).expect("register");
    let Ok(Some(LogHandle::Create {
        drv_path,
        max_bytes,
        append: false,
    })) = attempts.take_log(id(1), MachineId(1))
    else {
        panic!("the first stream creates the log");
    };
    assert_eq!(drv_path, StoreDir::default().print(&drv));
    assert_eq!(max_bytes, 10);
    assert!(matches!(attempts.take_log(id(1), MachineId(1)), Ok(None)));
    assert!(attempts.take_log(id(1), MachineId(2)).is_err());
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = LogWriter::create(dir.path(), &drv_path, max_bytes)
        .await
        .expect("log file");
    assert!(attempts.put_log(id(1), writer).is_none());
    assert!(matches!(
        attempts.take_log(id(1), MachineId(1)),
        Ok(Some(LogHandle::Resume(_)))
    ));
}

#[test]
fn the_input_closure_is_rooted_at_the_basic_derivations_input_sources() {
    let entry = AttemptEntry::from_assignment(MachineId(1), &input_addressed()).expect("entry");
    assert_eq!(entry.input_roots(), &[path(INPUT)]);
}
