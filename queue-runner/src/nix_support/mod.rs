//! The `nix-support/` files of a finished build's outputs: build products,
//! metrics, the release name and the `failed` marker, as the contract's
//! "Files in a build's outputs" section describes them.
//!
//! Two layers. Pure parsers over text ([`parse_product_line`],
//! [`parse_metrics`], [`parse_release_name`]) that accept any input without
//! panicking; and a reader ([`read_outputs`]) that applies them to output
//! directories on disk and checks every path a product names.
//!
//! Invariants: an output's contents are written by a builder and may be
//! hostile. The reader never reads outside the store: a product path is
//! canonicalised (`..` and symlinks resolved) and must still lie strictly
//! inside the canonical store directory; an output, its `nix-support`
//! directory and the files read from it must be a real directory and regular
//! files (a symlink there is treated as absent, as Hydra does, since it
//! only sees NAR members); metadata files are read only up to
//! [`MAX_METADATA_FILE_BYTES`]; a product's sha256 is computed by streaming,
//! in constant memory, and the file hashed is checked to be the one that was
//! examined.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use sluice_core::Status;

/// The largest `hydra-build-products`, `hydra-metrics` or
/// `hydra-release-name` file read; a larger one is ignored as if absent.
pub const MAX_METADATA_FILE_BYTES: u64 = 1 << 20;

/// One line of `hydra-build-products`, before its path is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductLine {
    /// `type`, e.g. `file` or `doc`.
    pub kind: String,
    pub subtype: String,
    /// As written, without the quotes of a quoted path.
    pub path: String,
    /// The optional fourth field; `""` when absent.
    pub default_path: String,
}

/// A product that passed the checks, as `BuildProducts` records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildProduct {
    pub kind: String,
    pub subtype: String,
    /// The product's path with `.` and `..` removed (symlinks kept), inside
    /// the store directory.
    pub path: String,
    /// The path's file name, or `""` when the product is an output itself
    /// or its file name has characters Hydra does not allow in a name.
    pub name: String,
    pub default_path: String,
    /// Set for regular files only.
    pub file: Option<RegularFile>,
}

/// Size and digest of a product that is a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegularFile {
    pub size: u64,
    pub sha256: [u8; 32],
}

impl RegularFile {
    /// The digest as `BuildProducts.sha256hash` stores it: lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// One line of `hydra-metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildMetric {
    pub name: String,
    /// Always finite.
    pub value: f64,
    /// `None` when absent or not matching `[a-zA-Z0-9._%-]+`.
    pub unit: Option<String>,
}

/// Everything the `nix-support/` files of a build's outputs say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NixSupport {
    /// `nix-support/failed` exists in some output.
    pub failed: bool,
    /// From the last output (in the order given) with a valid
    /// `hydra-release-name`.
    pub release_name: Option<String>,
    /// One per name (the last line with a name wins), sorted by name.
    pub metrics: Vec<BuildMetric>,
    /// In the order of the outputs, then of the lines.
    pub products: Vec<BuildProduct>,
}

impl NixSupport {
    /// The build's status when its step succeeded: 6 if an output has
    /// `nix-support/failed`, else 0.
    pub fn build_status(&self) -> Status {
        if self.failed {
            Status::FailedWithOutput
        } else {
            Status::Success
        }
    }
}

/// Why the outputs could not be read. A hostile product line is never an
/// error (it is skipped); these are configuration or infrastructure faults.
#[derive(Debug, thiserror::Error)]
pub enum NixSupportError {
    #[error("reading nix-support: store directory {store_dir}: {source}")]
    StoreDir {
        store_dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading nix-support: output {name} at {path} is not a path directly inside the store directory {store_dir}")]
    OutputOutsideStore {
        name: String,
        path: String,
        store_dir: PathBuf,
    },
    #[error("reading nix-support of output {name}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading nix-support: the reading task failed: {0}")]
    Task(String),
}

/// `[[:space:]]` of POSIX regular expressions, which Hydra's product
/// pattern uses.
fn is_posix_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// The separators of Nix's `tokenizeString` and `trim`.
fn is_nix_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn all_chars(s: &str, allowed: impl Fn(char) -> bool) -> bool {
    s.chars().all(allowed)
}

/// `[a-zA-Z0-9_-]+`: a product's type and subtype.
fn is_product_word(s: &str) -> bool {
    !s.is_empty() && all_chars(s, |c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `[a-zA-Z0-9._-]+`: a metric name.
fn is_metric_name(s: &str) -> bool {
    !s.is_empty()
        && all_chars(s, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
        })
}

/// `[a-zA-Z0-9._%-]+`: a metric unit.
fn is_metric_unit(s: &str) -> bool {
    !s.is_empty()
        && all_chars(s, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '%' | '-')
        })
}

/// `[a-zA-Z0-9.@:_-]+`: a release name.
fn is_release_name(s: &str) -> bool {
    !s.is_empty()
        && all_chars(s, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '@' | ':' | '_' | '-')
        })
}

/// `[a-zA-Z0-9.@:_+ -]*`: the names Hydra keeps for a product; others
/// become `""`.
fn is_product_name(s: &str) -> bool {
    all_chars(s, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '.' | '@' | ':' | '_' | '+' | ' ' | '-')
    })
}

/// Splits at the first POSIX space: (word, rest starting with the space).
fn split_word(s: &str) -> (&str, &str) {
    let end = s.find(is_posix_space).unwrap_or(s.len());
    s.split_at(end)
}

fn skip_space(s: &str) -> &str {
    s.trim_start_matches(is_posix_space)
}

/// Parses one `hydra-build-products` line, `type subtype path
/// [defaultPath]`, the way Hydra's pattern does: the path is either
/// double-quoted (one or more characters other than `"`) or a run of
/// characters other than space, `<`, `>` and `"`; the default path is a
/// run of characters other than space, `<` and `>`. Leading and trailing
/// spaces are ignored (Hydra skips such lines). `None` for anything else.
pub fn parse_product_line(line: &str) -> Option<ProductLine> {
    let line = line.trim_matches(is_posix_space);
    let (kind, rest) = split_word(line);
    if !is_product_word(kind) {
        return None;
    }
    let (subtype, rest) = split_word(skip_space(rest));
    if !is_product_word(subtype) {
        return None;
    }
    let rest = skip_space(rest);
    let (path, rest) = if let Some(quoted) = rest.strip_prefix('"') {
        let close = quoted.find('"')?;
        let (path, after) = quoted.split_at(close);
        (path, after.get(1..)?)
    } else {
        let (path, after) = split_word(rest);
        if path.contains(['<', '>', '"']) {
            return None;
        }
        (path, after)
    };
    if path.is_empty() {
        return None;
    }
    let default_path = if rest.is_empty() {
        ""
    } else {
        if !rest.starts_with(is_posix_space) {
            return None;
        }
        let (default_path, after) = split_word(skip_space(rest));
        if !after.is_empty() || default_path.contains(['<', '>']) {
            return None;
        }
        default_path
    };
    Some(ProductLine {
        kind: kind.to_owned(),
        subtype: subtype.to_owned(),
        path: path.to_owned(),
        default_path: default_path.to_owned(),
    })
}

/// Parses one `hydra-metrics` line, `name value [unit]` (further fields
/// are ignored). `None` when the name is invalid or the value is not a
/// finite number.
pub fn parse_metric_line(line: &str) -> Option<BuildMetric> {
    let mut fields = line.split(is_nix_space).filter(|f| !f.is_empty());
    let name = fields.next()?;
    let value = fields.next()?;
    if !is_metric_name(name) {
        return None;
    }
    let value: f64 = value.parse().ok().filter(|v: &f64| v.is_finite())?;
    let unit = fields
        .next()
        .filter(|u| is_metric_unit(u))
        .map(str::to_owned);
    Some(BuildMetric {
        name: name.to_owned(),
        value,
        unit,
    })
}

/// All metrics of a `hydra-metrics` file, one per name (the last line
/// wins), sorted by name.
pub fn parse_metrics(text: &str) -> Vec<BuildMetric> {
    let mut by_name = BTreeMap::new();
    for metric in text.lines().filter_map(parse_metric_line) {
        by_name.insert(metric.name.clone(), metric);
    }
    by_name.into_values().collect()
}

/// The contents of `hydra-release-name`, trimmed, if they match
/// `[a-zA-Z0-9.@:_-]+`.
pub fn parse_release_name(text: &str) -> Option<String> {
    let name = text.trim_matches(is_nix_space);
    is_release_name(name).then(|| name.to_owned())
}

/// `path` with `.`, `..` and repeated slashes removed, without looking at
/// the file system (Nix's `canonPath`). `None` unless absolute.
pub fn lexical_canonical(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The name part of a store path's base name (`<hash>-<name>`).
pub fn store_path_name(base_name: &str) -> &str {
    base_name
        .split_once('-')
        .map_or(base_name, |(_, name)| name)
}

/// The build's outputs with what the reader has established about them.
struct Output<'a> {
    name: &'a str,
    /// As the database knows it, under the logical store directory.
    path: &'a str,
    /// The same path under the canonical store directory.
    real: PathBuf,
    /// `lstat` says it is a directory (not a symlink to one).
    is_dir: bool,
}

/// Reads the `nix-support/` files of a build's outputs, given as
/// `(output name, store path)` pairs, on a blocking thread.
///
/// `store_dir` is the store directory both as output paths name it and as
/// it lies on disk (tests pass a temporary directory).
pub async fn read_outputs(
    store_dir: impl Into<PathBuf>,
    outputs: &[(String, String)],
) -> Result<NixSupport, NixSupportError> {
    let store_dir = store_dir.into();
    let outputs = outputs.to_vec();
    tokio::task::spawn_blocking(move || read_outputs_blocking(&store_dir, &outputs))
        .await
        .map_err(|e| NixSupportError::Task(e.to_string()))?
}

/// [`read_outputs`] on the calling thread.
pub fn read_outputs_blocking(
    store_dir: &Path,
    outputs: &[(String, String)],
) -> Result<NixSupport, NixSupportError> {
    let real_store = fs::canonicalize(store_dir).map_err(|source| NixSupportError::StoreDir {
        store_dir: store_dir.to_owned(),
        source,
    })?;
    let logical_store = store_dir.to_string_lossy().trim_end_matches('/').to_owned();

    let mut resolved = Vec::with_capacity(outputs.len());
    for (name, path) in outputs {
        let outside = || NixSupportError::OutputOutsideStore {
            name: name.clone(),
            path: path.clone(),
            store_dir: store_dir.to_owned(),
        };
        let base = path
            .strip_prefix(&logical_store)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|base| !base.contains('/') && !matches!(*base, "" | "." | ".."))
            .ok_or_else(outside)?;
        let real = real_store.join(base);
        let is_dir = match fs::symlink_metadata(&real) {
            Ok(meta) => meta.is_dir(),
            Err(source) => {
                return Err(NixSupportError::Io {
                    name: name.clone(),
                    path: real,
                    source,
                })
            }
        };
        resolved.push(Output {
            name,
            path,
            real,
            is_dir,
        });
    }

    let mut support = NixSupport::default();
    let mut metrics = BTreeMap::new();
    let mut product_lines: Vec<ProductLine> = Vec::new();
    let mut explicit_products = false;

    for output in &resolved {
        if !output.is_dir {
            continue;
        }
        let dir = output.real.join("nix-support");
        let io_err = |path: PathBuf| {
            let name = output.name.to_owned();
            move |source| NixSupportError::Io { name, path, source }
        };
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(dir)(e)),
        }

        let failed = dir.join("failed");
        match fs::symlink_metadata(&failed) {
            Ok(_) => support.failed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(failed)(e)),
        }

        let file = dir.join("hydra-build-products");
        if let Some(text) = read_metadata_file(&file).map_err(io_err(file.clone()))? {
            explicit_products = true;
            product_lines.extend(text.lines().filter_map(parse_product_line));
        }

        let file = dir.join("hydra-metrics");
        if let Some(text) = read_metadata_file(&file).map_err(io_err(file.clone()))? {
            for metric in parse_metrics(&text) {
                metrics.insert(metric.name.clone(), metric);
            }
        }

        let file = dir.join("hydra-release-name");
        if let Some(text) = read_metadata_file(&file).map_err(io_err(file.clone()))? {
            if let Some(name) = parse_release_name(&text) {
                support.release_name = Some(name);
            }
        }
    }
    support.metrics = metrics.into_values().collect();

    if explicit_products {
        for line in product_lines {
            match check_product(&logical_store, &real_store, &resolved, &line) {
                Ok(product) => support.products.push(product),
                Err(reason) => {
                    tracing::debug!(path = %line.path, %reason, "build product skipped")
                }
            }
        }
    } else {
        // Without a products file, each output that is a directory is one
        // product.
        for output in resolved.iter().filter(|o| o.is_dir) {
            let base = output.path.rsplit('/').next().unwrap_or(output.path);
            support.products.push(BuildProduct {
                kind: "nix-build".into(),
                subtype: if output.name == "out" {
                    String::new()
                } else {
                    output.name.to_owned()
                },
                path: output.path.to_owned(),
                name: store_path_name(base).to_owned(),
                default_path: String::new(),
                file: None,
            });
        }
    }
    Ok(support)
}

/// The contents of a metadata file: `None` if it is absent, not a regular
/// file (a symlink included) or larger than [`MAX_METADATA_FILE_BYTES`].
/// Invalid UTF-8 is replaced, so such lines simply fail to parse.
fn read_metadata_file(path: &Path) -> io::Result<Option<String>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > MAX_METADATA_FILE_BYTES {
        tracing::warn!(path = %path.display(), size = meta.len(), "nix-support file too large; ignored");
        return Ok(None);
    }
    let Some(file) = open_same_file(path, &meta)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(MAX_METADATA_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_METADATA_FILE_BYTES {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Opens `path` and checks that the file opened is the one `meta` (from
/// `lstat`) describes, so that a symlink swapped in between is never read.
fn open_same_file(path: &Path, meta: &fs::Metadata) -> io::Result<Option<File>> {
    let file = File::open(path)?;
    let opened = file.metadata()?;
    if opened.dev() != meta.dev() || opened.ino() != meta.ino() || !opened.is_file() {
        return Ok(None);
    }
    Ok(Some(file))
}

/// Checks a product line against the store and the file system.
fn check_product(
    logical_store: &str,
    real_store: &Path,
    outputs: &[Output<'_>],
    line: &ProductLine,
) -> Result<BuildProduct, String> {
    let path = lexical_canonical(&line.path).ok_or("not an absolute path")?;
    let inside = path
        .strip_prefix(logical_store)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|rest| !rest.is_empty())
        .ok_or("not inside the store")?;
    // Resolve symlinks and check again: the product must not lead out of
    // the store.
    let real = fs::canonicalize(real_store.join(inside)).map_err(|e| e.to_string())?;
    match real.strip_prefix(real_store) {
        Ok(rest)
            if rest
                .components()
                .next()
                .is_some_and(|c| matches!(c, Component::Normal(_))) => {}
        _ => return Err("resolves to a path outside the store".into()),
    }
    let meta = fs::symlink_metadata(&real).map_err(|e| e.to_string())?;
    let file = if meta.is_file() {
        Some(hash_file(&real, &meta).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let is_output = outputs.iter().any(|o| o.path == path);
    let name = if is_output {
        String::new()
    } else {
        let base = path.rsplit('/').next().unwrap_or_default();
        if is_product_name(base) {
            base.to_owned()
        } else {
            String::new()
        }
    };
    Ok(BuildProduct {
        kind: line.kind.clone(),
        subtype: line.subtype.clone(),
        path,
        name,
        default_path: line.default_path.clone(),
        file,
    })
}

/// Size and sha256 of a regular file, read in fixed-size chunks.
fn hash_file(path: &Path, meta: &fs::Metadata) -> io::Result<RegularFile> {
    let mut file = open_same_file(path, meta)?
        .ok_or_else(|| io::Error::other("the file changed while being examined"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        size += n as u64;
    }
    Ok(RegularFile {
        size,
        sha256: hasher.finalize().into(),
    })
}

#[cfg(test)]
mod tests;
