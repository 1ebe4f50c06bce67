//! Unit tests of the parent module.
use super::*;

fn line(kind: &str, subtype: &str, path: &str, default_path: &str) -> ProductLine {
    ProductLine {
        kind: kind.into(),
        subtype: subtype.into(),
        path: path.into(),
        default_path: default_path.into(),
    }
}

#[test]
fn product_lines_as_hydra_reads_them() {
    assert_eq!(
        parse_product_line("file binary-dist /nix/store/x-a/bin/a"),
        Some(line("file", "binary-dist", "/nix/store/x-a/bin/a", ""))
    );
    assert_eq!(
        parse_product_line("doc manual /nix/store/x-a/share/doc index.html"),
        Some(line(
            "doc",
            "manual",
            "/nix/store/x-a/share/doc",
            "index.html"
        ))
    );
    assert_eq!(
        parse_product_line("file  iso\t\"/nix/store/x-a/my file.iso\"  "),
        Some(line("file", "iso", "/nix/store/x-a/my file.iso", ""))
    );
    assert_eq!(
        parse_product_line("report coverage \"/nix/store/x-a/a b\" index.html\r"),
        Some(line(
            "report",
            "coverage",
            "/nix/store/x-a/a b",
            "index.html"
        ))
    );
    // A quoted path may hold what an unquoted one may not.
    assert_eq!(
        parse_product_line("file x \"/s/<a>\""),
        Some(line("file", "x", "/s/<a>", ""))
    );
}

#[test]
fn malformed_product_lines_are_skipped() {
    for bad in [
        "",
        "   ",
        "file",
        "file doc",
        "file doc   ",
        "fi.le doc /nix/store/x",
        "file do/c /nix/store/x",
        "file doc \"\"",
        "file doc \"/nix/store/unterminated",
        "file doc \"/nix/store/a b\"junk",
        "file doc /nix/store/<x>",
        "file doc /nix/st\"ore",
        "file doc /nix/store/x default extra",
        "file doc /nix/store/x <default>",
        "é doc /nix/store/x",
    ] {
        assert_eq!(parse_product_line(bad), None, "{bad:?}");
    }
}

#[test]
fn metrics_follow_the_contract() {
    assert_eq!(
        parse_metric_line("time 12.5 s"),
        Some(BuildMetric {
            name: "time".into(),
            value: 12.5,
            unit: Some("s".into())
        })
    );
    assert_eq!(
        parse_metric_line("  nix-env.qaCount\t4  "),
        Some(BuildMetric {
            name: "nix-env.qaCount".into(),
            value: 4.0,
            unit: None
        })
    );
    // An invalid unit is dropped, the metric kept.
    assert_eq!(
        parse_metric_line("cover 93 per/cent").map(|m| m.unit),
        Some(None)
    );
    assert_eq!(
        parse_metric_line("cover 93 % extra").map(|m| m.unit),
        Some(Some("%".into()))
    );
    for bad in [
        "",
        "name",
        "name notanumber",
        "name 12abc",
        "name NaN",
        "name inf",
        "na/me 1",
    ] {
        assert_eq!(parse_metric_line(bad), None, "{bad:?}");
    }
    let all = parse_metrics("b 1\na 2 ms\nbogus\nb 3\n");
    let names: Vec<_> = all.iter().map(|m| (m.name.as_str(), m.value)).collect();
    assert_eq!(names, [("a", 2.0), ("b", 3.0)]);
}

#[test]
fn release_names_are_trimmed_and_checked() {
    assert_eq!(
        parse_release_name("  nixos-25.11pre708350\n"),
        Some("nixos-25.11pre708350".into())
    );
    assert_eq!(
        parse_release_name("user@host:v1_2"),
        Some("user@host:v1_2".into())
    );
    assert_eq!(parse_release_name(""), None);
    assert_eq!(parse_release_name("\n"), None);
    assert_eq!(parse_release_name("two words"), None);
    assert_eq!(parse_release_name("a/b"), None);
}

#[test]
fn lexical_canonicalisation() {
    assert_eq!(
        lexical_canonical("/a/./b//c/../d").as_deref(),
        Some("/a/b/d")
    );
    assert_eq!(lexical_canonical("/../../etc").as_deref(), Some("/etc"));
    assert_eq!(lexical_canonical("/").as_deref(), Some("/"));
    assert_eq!(lexical_canonical("a/b"), None);
    assert_eq!(store_path_name("abc-hello-1.0"), "hello-1.0");
    assert_eq!(store_path_name("nohash"), "nohash");
}

/// A small deterministic generator (xorshift64*), so the property tests
/// need no extra dependency and replay the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from.get(self.below(from.len())).copied().unwrap_or("")
    }
}

/// Pieces chosen to hit every branch: separators, quotes, brackets,
/// multi-byte and control characters, numbers and names.
const PIECES: &[&str] = &[
    " ",
    "\t",
    "\x0b",
    "\r",
    "\"",
    "<",
    ">",
    "/",
    "..",
    ".",
    "-",
    "_",
    "%",
    "@",
    ":",
    "+",
    "é",
    "\u{1F600}",
    "\0",
    "file",
    "doc",
    "/nix/store/abc-x",
    "1.5",
    "-3e7",
    "NaN",
    "inf",
    "0x10",
    "a b",
    "\"q\"",
    "\n",
];

fn random_text(rng: &mut Rng) -> String {
    let len = rng.below(12);
    (0..len).map(|_| rng.pick(PIECES)).collect()
}

#[test]
fn parsers_never_panic_on_arbitrary_text() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for _ in 0..50_000 {
        let text = random_text(&mut rng);
        if let Some(p) = parse_product_line(&text) {
            assert!(is_product_word(&p.kind) && is_product_word(&p.subtype));
            assert!(!p.path.is_empty());
        }
        if let Some(m) = parse_metric_line(&text) {
            assert!(m.value.is_finite() && is_metric_name(&m.name));
        }
        if let Some(r) = parse_release_name(&text) {
            assert!(is_release_name(&r));
        }
        let _ = parse_metrics(&text);
        let _ = lexical_canonical(&text);
    }
    // Arbitrary bytes, decoded the way the reader decodes them.
    for _ in 0..20_000 {
        let len = rng.below(64);
        let bytes: Vec<u8> = (0..len).map(|_| (rng.next() & 0xff) as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_product_line(&text);
        let _ = parse_metrics(&text);
        let _ = parse_release_name(&text);
    }
}

#[test]
fn well_formed_product_lines_round_trip() {
    const WORDS: &[&str] = &["file", "doc", "nix-build", "a_b", "X9", "-"];
    const PATH_PARTS: &[&str] = &["a", "b c", "é", ".", "..", "x.iso", "<", "+", "\t"];
    let mut rng = Rng(0x0dd_ba11);
    for _ in 0..20_000 {
        let kind = rng.pick(WORDS).to_owned();
        let subtype = rng.pick(WORDS).to_owned();
        let parts: Vec<&str> = (0..1 + rng.below(4))
            .map(|_| rng.pick(PATH_PARTS))
            .collect();
        let path = format!("/nix/store/{}", parts.join("/"));
        let default_path = if rng.below(2) == 0 {
            String::new()
        } else {
            rng.pick(&["index.html", "a\"b", "x/y"]).to_owned()
        };
        let needs_quotes = path.contains(|c: char| is_posix_space(c) || "<>\"".contains(c));
        let sep = rng.pick(&[" ", "\t", "  "]);
        let mut text = if needs_quotes || rng.below(2) == 0 {
            format!("{kind}{sep}{subtype}{sep}\"{path}\"")
        } else {
            format!("{kind}{sep}{subtype}{sep}{path}")
        };
        if !default_path.is_empty() {
            text.push_str(sep);
            text.push_str(&default_path);
        }
        assert_eq!(
            parse_product_line(&text),
            Some(line(&kind, &subtype, &path, &default_path)),
            "{text:?}"
        );
    }
}
