//! NAR against real Nix: our archives equal `nix-store --dump` byte for
//! byte, our hashes equal `nix path-info`'s, and Nix's archives restore to
//! the same tree. Plus robustness properties of the decoder.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;
use sluice_nix::hash::Hash;
use sluice_nix::nar::{
    self, dump_path, restore_path, FeedError, NarDecoder, NarError, NarEvent, NAR_MAGIC,
};
use sluice_test_support::nix::{run, NixCommands, NixEnv};

fn nix_dump(env: &NixEnv, path: &Path) -> Vec<u8> {
    let out = env
        .command("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("running nix-store --dump");
    assert!(
        out.status.success(),
        "nix-store --dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn our_dump(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    let summary = dump_path(path, &mut bytes).expect("archiving with our encoder");
    assert_eq!(summary.nar_size, bytes.len() as u64);
    assert_eq!(summary.nar_hash, Hash::sha256(&bytes));
    bytes
}

fn write_file(path: &Path, contents: &[u8], mode: u32) {
    std::fs::write(path, contents).expect("writing a test file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A tree with every node type and names whose byte order differs from
/// most human orders.
fn tricky_tree(root: &Path) {
    std::fs::create_dir(root).expect("mkdir root");
    for (i, name) in ["a", "a.b", "a-b", "A", "ä", "10", "9", "Z", "_", "~", "a b"]
        .iter()
        .enumerate()
    {
        write_file(&root.join(name), name.repeat(i + 1).as_bytes(), 0o644);
    }
    write_file(&root.join("exec"), b"#!/bin/sh\necho hi\n", 0o755);
    // Owner-execute alone makes a file executable; group/other bits do not.
    write_file(&root.join("owner-x"), b"x", 0o700);
    write_file(&root.join("group-x"), b"x", 0o654);
    write_file(&root.join("empty"), b"", 0o644);
    write_file(&root.join("eight"), b"12345678", 0o644);
    let big: Vec<u8> = (0..(1 << 20) + 3).map(|i: u32| (i % 251) as u8).collect();
    write_file(&root.join("big"), &big, 0o644);
    std::os::unix::fs::symlink("a", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).expect("symlink");
    std::os::unix::fs::symlink("sub/deeper", root.join("to-dir")).expect("symlink");
    std::fs::create_dir(root.join("empty-dir")).expect("mkdir");
    std::fs::create_dir_all(root.join("sub/deeper/deepest")).expect("mkdir -p");
    write_file(&root.join("sub/deeper/deepest/f"), b"deep", 0o444);
    write_file(&root.join("sub/b"), b"b", 0o755);
    write_file(&root.join("sub/B"), b"B", 0o644);
}

#[test]
fn our_nar_equals_nix_store_dump() {
    let env = NixEnv::new();
    let root = env.dir().join("tree");
    tricky_tree(&root);
    let theirs = nix_dump(&env, &root);
    let ours = our_dump(&root);
    assert!(ours == theirs, "our NAR differs from nix-store --dump");
    // Single files and symlinks are archives too.
    for node in ["exec", "empty", "link", "empty-dir"] {
        let path = root.join(node);
        assert!(
            our_dump(&path) == nix_dump(&env, &path),
            "NAR of {node} differs"
        );
    }
}

#[test]
fn our_hash_equals_path_info_nar_hash() {
    let env = NixEnv::new();
    let drv = env.instantiate(
        r#"{ out = mkDrv {
              name = "nar-hash";
              args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $out/bin; echo ${nonce} > $out/data; printf '#!/bin/sh\n' > $out/bin/run; chmod +x $out/bin/run; ln -s ../data $out/bin/data" ];
            }; }"#,
        &["out"],
    );
    let outputs = env.realise(&drv[0]);
    let out = &outputs[0];
    let json = run(env.command("nix").args(["path-info", "--json", out]));
    let info: serde_json::Value = serde_json::from_str(&json).expect("path-info prints JSON");
    let nar_hash = info[0]["narHash"].as_str().expect("narHash is a string");
    let nar_size = info[0]["narSize"].as_u64().expect("narSize is a number");
    let theirs = Hash::parse_any(nar_hash, None).expect("narHash parses");

    let mut sink = std::io::sink();
    let summary = dump_path(Path::new(out), &mut sink).expect("archiving a store path");
    assert_eq!(summary.nar_hash, theirs);
    assert_eq!(summary.nar_size, nar_size);
}

fn assert_same_tree(a: &Path, b: &Path) {
    let ma = std::fs::symlink_metadata(a).expect("lstat");
    let mb = std::fs::symlink_metadata(b).expect("lstat");
    assert_eq!(ma.file_type(), mb.file_type(), "{}", a.display());
    if ma.is_symlink() {
        assert_eq!(std::fs::read_link(a).ok(), std::fs::read_link(b).ok());
    } else if ma.is_file() {
        assert_eq!(
            ma.permissions().mode() & 0o100,
            mb.permissions().mode() & 0o100,
            "executable bit of {}",
            a.display()
        );
        assert!(
            std::fs::read(a).ok() == std::fs::read(b).ok(),
            "{}",
            a.display()
        );
    } else {
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .expect("readdir")
                .map(|e| e.expect("entry").file_name())
                .collect();
            v.sort();
            v
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "entries of {}", a.display());
        for n in na {
            assert_same_tree(&a.join(&n), &b.join(&n));
        }
    }
}

#[test]
fn restoring_nix_nar_reproduces_the_tree() {
    let env = NixEnv::new();
    let root = env.dir().join("tree");
    tricky_tree(&root);
    let theirs = nix_dump(&env, &root);

    let restored = env.dir().join("restored");
    let summary = restore_path(&theirs[..], &restored).expect("restoring Nix's NAR");
    assert_eq!(summary.nar_hash, Hash::sha256(&theirs));
    assert_same_tree(&root, &restored);
    assert!(nix_dump(&env, &restored) == theirs);

    // The same through the async restorer, fed in small pieces.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let restored_async = env.dir().join("restored-async");
    let reader = tokio::io::BufReader::with_capacity(1000, &theirs[..]);
    let summary = rt
        .block_on(async {
            let mut reader = reader;
            nar::stream::restore_async(&mut reader, &restored_async).await
        })
        .expect("restoring asynchronously");
    assert_eq!(summary.nar_size, theirs.len() as u64);
    assert_same_tree(&root, &restored_async);

    // Restoring over an existing path is refused.
    assert!(restore_path(&theirs[..], &restored).is_err());
}

#[test]
fn async_dump_equals_nix_store_dump() {
    let env = NixEnv::new();
    let root = env.dir().join("tree");
    tricky_tree(&root);
    let theirs = nix_dump(&env, &root);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut ours = Vec::new();
    let summary = rt
        .block_on(nar::stream::dump_path_async(&root, &mut ours))
        .expect("async dump");
    assert!(ours == theirs);
    assert_eq!(summary.nar_hash, Hash::sha256(&theirs));
}

#[test]
fn async_copy_stops_exactly_at_the_end_of_the_archive() {
    use tokio::io::AsyncReadExt;
    let env = NixEnv::new();
    let root = env.dir().join("tree");
    tricky_tree(&root);
    let theirs = nix_dump(&env, &root);
    let mut stream = theirs.clone();
    stream.extend_from_slice(b"what follows the archive");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let mut reader = tokio::io::BufReader::with_capacity(777, &stream[..]);
        let mut copy = Vec::new();
        let summary = nar::stream::copy_nar(&mut reader, &mut copy)
            .await
            .expect("copying a valid archive");
        assert!(copy == theirs);
        assert_eq!(summary.nar_hash, Hash::sha256(&theirs));
        let mut rest = String::new();
        reader
            .read_to_string(&mut rest)
            .await
            .expect("reading the rest");
        assert_eq!(rest, "what follows the archive");

        let mut reader = tokio::io::BufReader::with_capacity(100, &theirs[..]);
        let mut files = 0;
        nar::stream::decode_async(&mut reader, |ev| {
            if let NarEvent::File { .. } = ev {
                files += 1;
            }
            Ok::<(), ()>(())
        })
        .await
        .expect("decoding");
        assert_eq!(files, 20, "regular files in the tricky tree");

        let truncated = &theirs[..theirs.len() - 9];
        let mut reader = tokio::io::BufReader::new(truncated);
        let err = nar::stream::copy_nar(&mut reader, &mut Vec::new())
            .await
            .expect_err("a truncated archive");
        assert!(matches!(
            err,
            nar::stream::NarStreamError::Nar(NarError::Truncated { .. })
        ));
    });
}

// ---- properties -------------------------------------------------------

/// A file tree generated by proptest.
#[derive(Debug, Clone)]
enum Node {
    File { executable: bool, contents: Vec<u8> },
    Symlink(Vec<u8>),
    Dir(std::collections::BTreeMap<Vec<u8>, Node>),
}

fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// Serialises a tree the way the format description says, independently of
/// the crate's encoder.
fn serialise(node: &Node, out: &mut Vec<u8>) {
    put(out, b"(");
    put(out, b"type");
    match node {
        Node::File {
            executable,
            contents,
        } => {
            put(out, b"regular");
            if *executable {
                put(out, b"executable");
                put(out, b"");
            }
            put(out, b"contents");
            put(out, contents);
        }
        Node::Symlink(target) => {
            put(out, b"symlink");
            put(out, b"target");
            put(out, target);
        }
        Node::Dir(entries) => {
            put(out, b"directory");
            for (name, child) in entries {
                for s in [&b"entry"[..], b"(", b"name", name, b"node"] {
                    put(out, s);
                }
                serialise(child, out);
                put(out, b")");
            }
        }
    }
    put(out, b")");
}

fn archive(node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, NAR_MAGIC.as_bytes());
    serialise(node, &mut out);
    out
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..12)
        .prop_filter("valid entry name", |n| nar::is_valid_entry_name(n))
}

fn tree() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(executable, contents)| Node::File {
                executable,
                contents
            }
        ),
        proptest::collection::vec(1u8..=255, 1..20).prop_map(Node::Symlink),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        proptest::collection::btree_map(name(), inner, 0..6).prop_map(Node::Dir)
    })
}

/// A directory being rebuilt: its entries and the name of the open entry.
type OpenDir = (std::collections::BTreeMap<Vec<u8>, Node>, Option<Vec<u8>>);

/// Rebuilds a tree from decoder events.
fn rebuild(bytes: &[u8], chunk: usize) -> Result<Node, NarError> {
    let mut decoder = NarDecoder::new();
    let mut stack: Vec<OpenDir> = Vec::new();
    let mut root = None;
    let mut file: Option<(bool, Vec<u8>)> = None;
    let place =
        |node: Node, stack: &mut Vec<OpenDir>, root: &mut Option<Node>| match stack.last_mut() {
            Some((entries, name)) => {
                let name: Vec<u8> = name.take().expect("node inside an entry");
                entries.insert(name, node);
            }
            None => *root = Some(node),
        };
    for piece in bytes.chunks(chunk.max(1)) {
        decoder
            .feed(piece, |ev| {
                match ev {
                    NarEvent::File { executable, .. } => file = Some((executable, Vec::new())),
                    NarEvent::Contents(c) => {
                        file.as_mut().expect("open file").1.extend_from_slice(c)
                    }
                    NarEvent::FileEnd => {
                        let (executable, contents) = file.take().expect("open file");
                        place(
                            Node::File {
                                executable,
                                contents,
                            },
                            &mut stack,
                            &mut root,
                        );
                    }
                    NarEvent::Symlink { target } => {
                        place(Node::Symlink(target.to_vec()), &mut stack, &mut root)
                    }
                    NarEvent::Directory => stack.push((Default::default(), None)),
                    NarEvent::Entry { name } => {
                        stack.last_mut().expect("open directory").1 = Some(name.to_vec())
                    }
                    NarEvent::EntryEnd => {}
                    NarEvent::DirectoryEnd => {
                        let (entries, _) = stack.pop().expect("open directory");
                        place(Node::Dir(entries), &mut stack, &mut root);
                    }
                }
                Ok::<(), ()>(())
            })
            .map_err(|e| match e {
                FeedError::Nar(e) => e,
                FeedError::Sink(()) => unreachable!("the sink never fails"),
            })?;
    }
    decoder.finish()?;
    Ok(root.expect("a complete archive has a root"))
}

fn same(a: &Node, b: &Node) -> bool {
    archive(a) == archive(b)
}

proptest! {
    #[test]
    fn decoding_rebuilds_the_tree(node in tree(), chunk in 1usize..100) {
        let bytes = archive(&node);
        let rebuilt = rebuild(&bytes, chunk).expect("a valid archive decodes");
        prop_assert!(same(&rebuilt, &node));
    }

    #[test]
    fn every_truncation_fails(node in tree(), cut in any::<prop::sample::Index>()) {
        let bytes = archive(&node);
        let len = cut.index(bytes.len());
        prop_assert_eq!(
            rebuild(&bytes[..len], 7).map(|_| ()),
            Err(NarError::Truncated { offset: len as u64 })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
        let _ = rebuild(&bytes, chunk);
        // Also behind a valid magic, so the structure parser is reached.
        let mut framed = Vec::new();
        put(&mut framed, NAR_MAGIC.as_bytes());
        framed.extend_from_slice(&bytes);
        let _ = rebuild(&framed, chunk);
    }

    #[test]
    fn corrupted_archives_never_panic(
        node in tree(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = archive(&node);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(rebuilt) = rebuild(&bytes, 5) {
            // Whatever decodes is a well-formed archive: re-serialising it
            // gives back the bytes.
            prop_assert_eq!(archive(&rebuilt), bytes);
        }
    }
}
