//! Decoder and encoder tests on hand-built archives.

use super::*;

/// Serialises a list of NAR strings (keywords, names, contents).
fn nar(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        put_str(&mut out, p);
    }
    out
}

fn file(contents: &[u8], executable: bool) -> Vec<&[u8]> {
    let mut v: Vec<&[u8]> = vec![b"(", b"type", b"regular"];
    if executable {
        v.extend_from_slice(&[b"executable", b""]);
    }
    v.extend_from_slice(&[b"contents", contents, b")"]);
    v
}

/// A directory with the given (name, node parts) entries.
fn dir<'a>(entries: &[(&'a [u8], Vec<&'a [u8]>)]) -> Vec<&'a [u8]> {
    let mut v: Vec<&[u8]> = vec![b"(", b"type", b"directory"];
    for (name, node) in entries {
        v.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
        v.extend_from_slice(node);
        v.push(b")");
    }
    v.push(b")");
    v
}

fn archive(node: Vec<&[u8]>) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = vec![NAR_MAGIC.as_bytes()];
    parts.extend(node);
    nar(&parts)
}

/// Decodes `bytes` fed in pieces of `chunk` bytes into owned events.
fn decode_chunked(bytes: &[u8], chunk: usize) -> Result<Vec<OwnedNarEvent>, NarError> {
    let mut decoder = NarDecoder::new();
    let mut events = Vec::new();
    for piece in bytes.chunks(chunk) {
        let used = decoder
            .feed(piece, |ev| {
                events.push(ev.to_owned_event());
                Ok::<(), ()>(())
            })
            .map_err(|e| match e {
                FeedError::Nar(e) => e,
                FeedError::Sink(()) => unreachable!("the sink never fails"),
            })?;
        assert_eq!(used, piece.len(), "archive ended early");
    }
    decoder.finish()?;
    Ok(merge_contents(events))
}

/// Joins adjacent `Contents` events, which depend on chunking.
fn merge_contents(events: Vec<OwnedNarEvent>) -> Vec<OwnedNarEvent> {
    let mut out: Vec<OwnedNarEvent> = Vec::new();
    for ev in events {
        if let (Some(OwnedNarEvent::Contents(prev)), OwnedNarEvent::Contents(next)) =
            (out.last_mut(), &ev)
        {
            prev.extend_from_slice(next);
            continue;
        }
        out.push(ev);
    }
    out
}

#[test]
fn decodes_a_tree_whatever_the_chunking() {
    let bytes = archive(dir(&[
        (b"a", file(b"hello", false)),
        (b"b", file(b"", true)),
        (
            b"c",
            dir(&[(
                b"link",
                vec![b"(", b"type", b"symlink", b"target", b"../a", b")"],
            )]),
        ),
        (b"d", dir(&[])),
    ]));
    use OwnedNarEvent::*;
    let expected = vec![
        Directory,
        Entry {
            name: b"a".to_vec(),
        },
        File {
            executable: false,
            size: 5,
        },
        Contents(b"hello".to_vec()),
        FileEnd,
        EntryEnd,
        Entry {
            name: b"b".to_vec(),
        },
        File {
            executable: true,
            size: 0,
        },
        FileEnd,
        EntryEnd,
        Entry {
            name: b"c".to_vec(),
        },
        Directory,
        Entry {
            name: b"link".to_vec(),
        },
        Symlink {
            target: b"../a".to_vec(),
        },
        EntryEnd,
        DirectoryEnd,
        EntryEnd,
        Entry {
            name: b"d".to_vec(),
        },
        Directory,
        DirectoryEnd,
        EntryEnd,
        DirectoryEnd,
    ];
    for chunk in [1, 2, 3, 7, 8, 13, 64, bytes.len()] {
        assert_eq!(
            decode_chunked(&bytes, chunk).expect("valid archive"),
            expected,
            "chunk size {chunk}"
        );
    }
}

#[test]
fn stops_at_the_end_of_the_archive() {
    let mut bytes = archive(file(b"x", false));
    let len = bytes.len();
    bytes.extend_from_slice(b"trailing bytes");
    let mut decoder = NarDecoder::new();
    let used = decoder
        .feed(&bytes, |_| Ok::<(), ()>(()))
        .expect("valid archive");
    assert_eq!(used, len);
    assert!(decoder.is_done());
    assert_eq!(decoder.position(), len as u64);
}

fn decode_err(bytes: &[u8]) -> NarError {
    decode_chunked(bytes, bytes.len().max(1)).expect_err("archive must be rejected")
}

#[test]
fn rejects_bad_magic() {
    assert_eq!(decode_err(&nar(&[b"nix-archive-2"])), NarError::BadMagic);
    assert_eq!(
        decode_err(&nar(&[b"a much longer string"])),
        NarError::BadMagic
    );
    assert_eq!(
        decode_err(b"\xff\xff\xff\xff\xff\xff\xff\xff"),
        NarError::BadMagic
    );
}

#[test]
fn rejects_bad_entry_names() {
    for name in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        let bytes = archive(dir(&[(name, file(b"", false))]));
        assert!(
            matches!(decode_err(&bytes), NarError::InvalidName { .. }),
            "name {name:?}"
        );
    }
}

#[test]
fn rejects_unsorted_and_duplicate_entries() {
    let bytes = archive(dir(&[(b"b", file(b"", false)), (b"a", file(b"", false))]));
    assert!(matches!(
        decode_err(&bytes),
        NarError::UnsortedEntries { .. }
    ));
    let bytes = archive(dir(&[(b"a", file(b"", false)), (b"a", file(b"", false))]));
    assert!(matches!(
        decode_err(&bytes),
        NarError::DuplicateEntry { .. }
    ));
    // Byte order, not locale order: "B" (0x42) sorts before "a" (0x61).
    let bytes = archive(dir(&[(b"a", file(b"", false)), (b"B", file(b"", false))]));
    assert!(matches!(
        decode_err(&bytes),
        NarError::UnsortedEntries { .. }
    ));
}

#[test]
fn rejects_non_zero_padding() {
    let mut bytes = archive(file(b"abc", false));
    // The contents' padding starts right after "abc".
    let at = bytes
        .windows(3)
        .position(|w| w == b"abc")
        .expect("contents present")
        + 3;
    bytes[at + 2] = 1;
    assert!(matches!(
        decode_err(&bytes),
        NarError::NonZeroPadding { .. }
    ));
    // Padding of a keyword.
    let mut bytes = archive(file(b"", false));
    // Magic (8 + 13 + 3 bytes), then the length and byte of "(", then its padding.
    bytes[24 + 8 + 1] = b'x';
    assert!(matches!(
        decode_err(&bytes),
        NarError::NonZeroPadding { .. }
    ));
}

#[test]
fn rejects_oversized_strings_without_allocating() {
    let mut bytes = nar(&[NAR_MAGIC.as_bytes()]);
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode_err(&bytes),
        NarError::StringTooLong {
            what: "keyword",
            ..
        }
    ));
    let long = vec![b'n'; 256];
    let bytes = archive(dir(&[(&long, file(b"", false))]));
    assert!(matches!(
        decode_err(&bytes),
        NarError::StringTooLong {
            what: "entry name",
            ..
        }
    ));
}

#[test]
fn rejects_unknown_tags_and_types() {
    let bytes = archive(vec![b"(", b"type", b"fifo", b")"]);
    assert!(matches!(decode_err(&bytes), NarError::UnknownType { .. }));
    let bytes = archive(vec![b"(", b"kind", b"regular"]);
    assert!(matches!(decode_err(&bytes), NarError::UnexpectedTag { .. }));
    let bytes = archive(vec![b"(", b"type", b"regular", b"mode", b"x"]);
    assert!(matches!(decode_err(&bytes), NarError::UnexpectedTag { .. }));
    let bytes = archive(vec![b"(", b"type", b"regular", b"executable", b"yes"]);
    assert!(matches!(decode_err(&bytes), NarError::StringTooLong { .. }));
    let bytes = archive(vec![b"(", b"type", b"symlink", b"target", b"", b")"]);
    assert!(matches!(
        decode_err(&bytes),
        NarError::InvalidSymlinkTarget { .. }
    ));
}

#[test]
fn rejects_nesting_beyond_the_limit() {
    let mut parts: Vec<&[u8]> = vec![NAR_MAGIC.as_bytes()];
    let depth = NarLimits::default().max_depth + 1;
    for _ in 0..depth {
        parts.extend_from_slice(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
        ]);
    }
    parts.extend(file(b"", false));
    let bytes = nar(&parts);
    assert!(matches!(decode_err(&bytes), NarError::TooDeep { .. }));
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = archive(dir(&[
        (b"a", file(b"0123456789", true)),
        (b"l", vec![b"(", b"type", b"symlink", b"target", b"a", b")"]),
    ]));
    for len in 0..bytes.len() {
        assert_eq!(
            decode_chunked(&bytes[..len], 5),
            Err(NarError::Truncated { offset: len as u64 }),
            "prefix of {len} bytes"
        );
    }
}

#[test]
fn errors_are_sticky() {
    let bytes = nar(&[b"nope"]);
    let mut decoder = NarDecoder::new();
    assert!(decoder.decode(&bytes).is_err());
    let next = nar(&[NAR_MAGIC.as_bytes()]);
    assert_eq!(
        decoder.decode(&next).map(|(n, _)| n),
        Err(NarError::BadMagic)
    );
    assert_eq!(decoder.finish(), Err(NarError::BadMagic));
}

#[test]
fn encoder_output_decodes_and_restores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(src.join("f"), vec![7u8; 100_003]).expect("write");
    std::fs::create_dir(src.join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("f", src.join("l")).expect("symlink");
    let mut bytes = Vec::new();
    let summary = dump_path(&src, &mut bytes).expect("dump");
    assert_eq!(summary.nar_size, bytes.len() as u64);
    assert_eq!(summary.nar_hash, crate::hash::Hash::sha256(&bytes));
    let dst = dir.path().join("dst");
    let restored = restore_path(&bytes[..], &dst).expect("restore");
    assert_eq!(restored, summary);
    let mut again = Vec::new();
    dump_path(&dst, &mut again).expect("dump again");
    assert_eq!(again, bytes);
}
