//! Where a binary cache is: a URI as Nix writes store URIs, parsed into a
//! [`Destination`], and opened as an `object_store` store.
//!
//! - `file:///absolute/dir`: a directory (created when missing).
//! - `s3://bucket?region=…&endpoint=…&profile=…&addressing-style=…&log-compression=…`:
//!   an S3 bucket, or a bucket of an S3-compatible server at `endpoint`
//!   (a URL, or `host:port` with `scheme=http|https`, as Nix accepts).
//!   `region` defaults to `us-east-1` as in Nix. Credentials come from
//!   `profile` in the shared credentials file
//!   (`$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`), else from
//!   the environment (`AWS_ACCESS_KEY_ID`, …, web identity, container or
//!   instance credentials, as `object_store` finds them), else from that
//!   file's `default` profile.
//! - Both take `priority` and `want-mass-query`, written to
//!   `nix-cache-info` (defaults 40 and true).
//!
//! Parsing does no IO; [`Destination::open`] reads a credentials file at
//! most, and never touches the network. Unknown schemes and parameters are
//! errors, so a typo never silently changes where the cache goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;

use crate::compression::Compression;

/// Why a URI names no usable cache.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("binary cache URI '{uri}': {reason}")]
    Malformed { uri: String, reason: String },
    #[error(
        "binary cache URI '{uri}': unknown scheme '{scheme}' (give file:///path or s3://bucket)"
    )]
    UnknownScheme { uri: String, scheme: String },
    #[error("binary cache URI '{uri}': unknown parameter '{name}'{hint}")]
    UnknownParameter {
        uri: String,
        name: String,
        hint: String,
    },
    #[error("binary cache URI '{uri}': parameter {name}={value}: {reason}")]
    BadParameter {
        uri: String,
        name: String,
        value: String,
        reason: String,
    },
    #[error("binary cache {uri}: AWS profile '{profile}': {reason}")]
    Profile {
        uri: String,
        profile: String,
        reason: String,
    },
    #[error("opening binary cache {uri}: {source}")]
    Open {
        uri: String,
        #[source]
        source: object_store::Error,
    },
}

/// How S3 requests name the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressingStyle {
    /// Virtual-hosted without an endpoint (path style for a bucket name
    /// with a dot), path style with one: what Nix does.
    Auto,
    /// `endpoint/bucket/key`.
    Path,
    /// `bucket.endpoint/key`.
    Virtual,
}

/// An S3 bucket and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Destination {
    pub bucket: String,
    pub region: String,
    /// The endpoint as a URL (`http://127.0.0.1:9000`); `None`: AWS's.
    pub endpoint: Option<url::Url>,
    pub addressing: AddressingStyle,
    pub profile: Option<String>,
    /// Build logs are uploaded compressed with this, and served with it as
    /// `Content-Encoding` (Nix's `log-compression`); `None`: plain.
    pub log_compression: Option<Compression>,
}

impl S3Destination {
    /// Whether requests name the bucket in the host.
    pub fn virtual_hosted(&self) -> bool {
        match self.addressing {
            AddressingStyle::Path => false,
            AddressingStyle::Virtual => true,
            AddressingStyle::Auto => self.endpoint.is_none() && !self.bucket.contains('.'),
        }
    }
}

/// What kind of store the cache is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    File(PathBuf),
    S3(S3Destination),
}

/// A parsed binary cache URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The URI as given, for messages (it holds no secret: credentials
    /// never go in it).
    pub uri: String,
    pub location: Location,
    /// `nix-cache-info`'s `Priority` (lower is preferred by clients).
    pub priority: u32,
    /// `nix-cache-info`'s `WantMassQuery`.
    pub want_mass_query: bool,
}

const DEFAULT_PRIORITY: u32 = 40;
const DEFAULT_REGION: &str = "us-east-1";

impl std::str::FromStr for Destination {
    type Err = DestinationError;

    fn from_str(uri: &str) -> Result<Destination, DestinationError> {
        Destination::parse(uri)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

/// The hint for a parameter Nix takes in a store URI that is a separate
/// setting here.
fn hint_for(name: &str, known: &[&str]) -> String {
    match name {
        "compression" => {
            " (set the NAR compression with --binary-cache-compression or binary-cache-compression)"
                .into()
        }
        "secret-key" | "secret-keys" => {
            " (give the signing key with --signing-key-file or signing-key-file)".into()
        }
        _ => format!(" (known here: {})", known.join(", ")),
    }
}

impl Destination {
    pub fn parse(uri: &str) -> Result<Destination, DestinationError> {
        let malformed = |reason: String| DestinationError::Malformed {
            uri: uri.to_owned(),
            reason,
        };
        let Some((scheme, _)) = uri.split_once("://") else {
            return Err(malformed(
                "no scheme (give file:///path or s3://bucket?region=…)".into(),
            ));
        };
        let parsed = url::Url::parse(uri).map_err(|e| malformed(e.to_string()))?;
        let mut params: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in parsed.query_pairs() {
            if params.insert(name.to_string(), value.to_string()).is_some() {
                return Err(malformed(format!("parameter '{name}' is given twice")));
            }
        }
        let bad = |name: &str, value: &str, reason: &str| DestinationError::BadParameter {
            uri: uri.to_owned(),
            name: name.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        let priority = match params.remove("priority") {
            None => DEFAULT_PRIORITY,
            Some(v) => v
                .parse()
                .map_err(|_| bad("priority", &v, "not a whole number"))?,
        };
        let want_mass_query = match params.remove("want-mass-query") {
            None => true,
            Some(v) => match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(bad("want-mass-query", &v, "give true or false")),
            },
        };
        let location = match scheme {
            "file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(malformed(
                        "a file:// cache is a local directory: write file:///absolute/path (three slashes)"
                            .into(),
                    ));
                }
                if parsed.path().len() <= 1 {
                    return Err(malformed("no directory after file://".into()));
                }
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| malformed("not an absolute local path".into()))?;
                if let Some((name, _)) = params.iter().next() {
                    let hint = if name == "log-compression" {
                        " (Nix reads logs from a file:// cache as they are, so they are stored plain)"
                            .to_owned()
                    } else {
                        hint_for(name, &["priority", "want-mass-query"])
                    };
                    return Err(DestinationError::UnknownParameter {
                        uri: uri.to_owned(),
                        name: name.clone(),
                        hint,
                    });
                }
                Location::File(dir)
            }
            "s3" => Location::S3(parse_s3(uri, &parsed, params)?),
            other => {
                return Err(DestinationError::UnknownScheme {
                    uri: uri.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        Ok(Destination {
            uri: uri.to_owned(),
            location,
            priority,
            want_mass_query,
        })
    }

    /// The store objects go to. For a directory, creates it if missing.
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>, DestinationError> {
        let open_err = |source| DestinationError::Open {
            uri: self.uri.clone(),
            source,
        };
        match &self.location {
            Location::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    open_err(object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: format!("creating {}: {e}", dir.display()).into(),
                    })
                })?;
                let store = LocalFileSystem::new_with_prefix(dir).map_err(open_err)?;
                Ok(Arc::new(store))
            }
            Location::S3(s3) => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_virtual_hosted_style_request(s3.virtual_hosted());
                if let Some(endpoint) = &s3.endpoint {
                    let mut endpoint = endpoint.clone();
                    if s3.virtual_hosted() {
                        let host = endpoint.host_str().unwrap_or_default().to_owned();
                        endpoint
                            .set_host(Some(&format!("{}.{host}", s3.bucket)))
                            .map_err(|e| {
                                open_err(object_store::Error::Generic {
                                    store: "S3",
                                    source: format!("virtual-hosted endpoint: {e}").into(),
                                })
                            })?;
                    }
                    builder = builder
                        .with_allow_http(endpoint.scheme() == "http")
                        .with_endpoint(endpoint.as_str().trim_end_matches('/'));
                }
                if let Some(creds) = self.credentials(s3)? {
                    builder = builder
                        .with_access_key_id(creds.access_key_id)
                        .with_secret_access_key(creds.secret_access_key);
                    if let Some(token) = creds.session_token {
                        builder = builder.with_token(token);
                    }
                }
                Ok(Arc::new(builder.build().map_err(open_err)?))
            }
        }
    }

    /// Static credentials from the shared credentials file: for `profile`
    /// (which must be there), or its `default` profile when nothing in the
    /// environment gives credentials.
    fn credentials(&self, s3: &S3Destination) -> Result<Option<Credentials>, DestinationError> {
        let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials"))
            });
        let profile_err = |profile: &str, reason: String| DestinationError::Profile {
            uri: self.uri.clone(),
            profile: profile.to_owned(),
            reason,
        };
        match &s3.profile {
            Some(profile) => {
                let Some(file) = file else {
                    return Err(profile_err(
                        profile,
                        "no credentials file: HOME and AWS_SHARED_CREDENTIALS_FILE are unset"
                            .into(),
                    ));
                };
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    profile_err(profile, format!("reading {}: {e}", file.display()))
                })?;
                credentials_of(&text, profile)
                    .map_err(|reason| profile_err(profile, format!("{}: {reason}", file.display())))
                    .map(Some)
            }
            None => {
                let from_env = std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
                    || std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_some()
                    || std::env::var_os("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").is_some();
                if from_env {
                    return Ok(None);
                }
                let Some(text) = file.and_then(|f| std::fs::read_to_string(f).ok()) else {
                    return Ok(None);
                };
                Ok(credentials_of(&text, "default").ok())
            }
        }
    }
}

fn parse_s3(
    uri: &str,
    parsed: &url::Url,
    mut params: BTreeMap<String, String>,
) -> Result<S3Destination, DestinationError> {
    let malformed = |reason: String| DestinationError::Malformed {
        uri: uri.to_owned(),
        reason,
    };
    let bad = |name: &str, value: &str, reason: String| DestinationError::BadParameter {
        uri: uri.to_owned(),
        name: name.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let bucket = parsed.host_str().unwrap_or_default().to_owned();
    if bucket.is_empty() {
        return Err(malformed("no bucket: write s3://bucket?region=…".into()));
    }
    if !parsed.path().is_empty() && parsed.path() != "/" {
        return Err(malformed(format!(
            "a path after the bucket ('{}') is not supported: the cache is the bucket's root",
            parsed.path()
        )));
    }
    if parsed.port().is_some() || !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(malformed(
            "an s3:// URI names a bucket only; give the server with endpoint=… and credentials with profile=… or the environment".into(),
        ));
    }
    let region = params
        .remove("region")
        .or_else(|| params.remove("aws-region"))
        .unwrap_or_else(|| DEFAULT_REGION.to_owned());
    let scheme = params.remove("scheme");
    if let Some(s) = &scheme {
        if s != "http" && s != "https" {
            return Err(bad("scheme", s, "give http or https".into()));
        }
    }
    let endpoint = match params.remove("endpoint") {
        None => None,
        Some(e) => {
            let full = if e.contains("://") {
                e.clone()
            } else {
                format!("{}://{e}", scheme.as_deref().unwrap_or("https"))
            };
            let url = url::Url::parse(&full).map_err(|err| bad("endpoint", &e, err.to_string()))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(bad("endpoint", &e, "not an http or https URL".into()));
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(bad("endpoint", &e, "no host".into()));
            }
            Some(url)
        }
    };
    let addressing = match params.remove("addressing-style").as_deref() {
        None | Some("auto") => AddressingStyle::Auto,
        Some("path") => AddressingStyle::Path,
        Some("virtual") => AddressingStyle::Virtual,
        Some(other) => {
            return Err(bad(
                "addressing-style",
                other,
                "give auto, path or virtual".into(),
            ))
        }
    };
    if let (AddressingStyle::Virtual, Some(url)) = (addressing, &endpoint) {
        if !matches!(url.host(), Some(url::Host::Domain(_))) {
            return Err(bad(
                "addressing-style",
                "virtual",
                format!(
                    "the endpoint {url} has no host name to put the bucket in; use addressing-style=path"
                ),
            ));
        }
    }
    let profile = params.remove("profile").filter(|p| !p.is_empty());
    let log_compression = match params.remove("log-compression") {
        None => None,
        Some(v) if v.is_empty() || v == "none" => None,
        Some(v) => Some(
            v.parse::<Compression>()
                .map_err(|e| bad("log-compression", &v, e.to_string()))?,
        ),
    };
    if let Some((name, _)) = params.iter().next() {
        return Err(DestinationError::UnknownParameter {
            uri: uri.to_owned(),
            name: name.clone(),
            hint: hint_for(
                name,
                &[
                    "region",
                    "endpoint",
                    "scheme",
                    "profile",
                    "addressing-style",
                    "log-compression",
                    "priority",
                    "want-mass-query",
                ],
            ),
        });
    }
    Ok(S3Destination {
        bucket,
        region,
        endpoint,
        addressing,
        profile,
        log_compression,
    })
}

struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// The static credentials of `profile` in an AWS shared credentials file
/// (INI: `[profile]` sections of `key = value` lines).
fn credentials_of(text: &str, profile: &str) -> Result<Credentials, String> {
    let mut section: Option<&str> = None;
    let mut found = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim());
            found |= section == Some(profile);
            continue;
        }
        if section != Some(profile) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_owned();
        match key.trim() {
            "aws_access_key_id" => id = Some(value),
            "aws_secret_access_key" => secret = Some(value),
            "aws_session_token" => token = Some(value),
            _ => {}
        }
    }
    if !found {
        return Err("no such profile".into());
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => Err("the profile lacks aws_access_key_id or aws_secret_access_key".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(uri: &str) -> S3Destination {
        match Destination::parse(uri).expect("parses").location {
            Location::S3(s3) => s3,
            other => panic!("{uri}: not S3: {other:?}"),
        }
    }

    fn error(uri: &str) -> String {
        Destination::parse(uri).expect_err("refused").to_string()
    }

    #[test]
    fn file_uris_name_absolute_directories() {
        let d = Destination::parse("file:///var/lib/cache%20dir").expect("parses");
        assert_eq!(d.location, Location::File("/var/lib/cache dir".into()));
        assert_eq!((d.priority, d.want_mass_query), (40, true));
        let d = Destination::parse("file:///c?priority=30&want-mass-query=false").expect("parses");
        assert_eq!((d.priority, d.want_mass_query), (30, false));
        assert!(error("file://relative/dir").contains("three slashes"));
        assert!(error("file://").contains("no directory"));
        assert!(error("file:///c?compression=xz").contains("--binary-cache-compression"));
        assert!(error("file:///c?log-compression=xz").contains("plain"));
        assert!(error("file:///c?priority=high").contains("whole number"));
    }

    #[test]
    fn s3_uris_take_nix_parameters() {
        let d = s3("s3://cache?region=eu-west-1&endpoint=http://127.0.0.1:9000&profile=ci&log-compression=zstd");
        assert_eq!(d.bucket, "cache");
        assert_eq!(d.region, "eu-west-1");
        assert_eq!(
            d.endpoint.as_ref().map(url::Url::as_str),
            Some("http://127.0.0.1:9000/")
        );
        assert_eq!(d.profile.as_deref(), Some("ci"));
        assert_eq!(d.log_compression, Some(Compression::Zstd));
        assert!(!d.virtual_hosted(), "a custom endpoint is path style");

        let d = s3("s3://cache");
        assert_eq!(d.region, "us-east-1");
        assert!(d.endpoint.is_none() && d.profile.is_none() && d.log_compression.is_none());
        assert!(d.virtual_hosted());
        assert!(!s3("s3://cache.example.org").virtual_hosted());

        // Nix's older form: host:port and a scheme.
        let d = s3("s3://cache?endpoint=minio.local:9000&scheme=http");
        assert_eq!(
            d.endpoint.as_ref().map(url::Url::as_str),
            Some("http://minio.local:9000/")
        );
        let d = s3("s3://cache?endpoint=minio.local:9000");
        assert_eq!(d.endpoint.as_ref().map(url::Url::scheme), Some("https"));
    }

    #[test]
    fn bad_s3_uris_are_refused_with_the_reason() {
        assert!(error("s3://").contains("no bucket"));
        assert!(error("s3://b/prefix").contains("path after the bucket"));
        assert!(error("s3://b?regoin=x").contains("unknown parameter 'regoin'"));
        assert!(error("s3://b?regoin=x").contains("region"));
        assert!(error("s3://b?secret-key=/k").contains("--signing-key-file"));
        assert!(error("s3://b?endpoint=ftp://x").contains("http"));
        assert!(error("s3://b?scheme=gopher").contains("http or https"));
        assert!(error("s3://b?addressing-style=odd").contains("auto, path or virtual"));
        assert!(error("s3://b?log-compression=br").contains("zstd, xz or none"));
        assert!(error("s3://b?region=a&region=b").contains("twice"));
        assert!(
            error("s3://b?endpoint=http://127.0.0.1:9000&addressing-style=virtual")
                .contains("addressing-style=path")
        );
    }

    #[test]
    fn unknown_schemes_and_non_uris_are_refused() {
        assert!(error("https://cache.example.org").contains("unknown scheme 'https'"));
        assert!(error("/var/cache").contains("no scheme"));
        assert!(error("gs://bucket").contains("file:///path or s3://bucket"));
    }

    #[test]
    fn s3_destinations_open_without_the_network() {
        let d = Destination::parse(
            "s3://sluice-test?region=eu-central-1&endpoint=http://minio.invalid:9000&addressing-style=virtual",
        )
        .expect("parses");
        let store = d.open().expect("builds an S3 client");
        assert!(store.to_string().contains("sluice-test"), "{store}");
        let d =
            Destination::parse("s3://sluice-test?endpoint=http://127.0.0.1:9000").expect("parses");
        d.open().expect("builds a path-style S3 client");
        let d = Destination::parse("s3://sluice-test").expect("parses");
        d.open().expect("builds an S3 client for AWS");
    }

    #[test]
    fn a_profile_is_read_from_the_credentials_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n[ci]\n# comment\naws_access_key_id=C\naws_secret_access_key = D\naws_session_token = E\n";
        let c = credentials_of(text, "ci").expect("ci");
        assert_eq!(
            (
                c.access_key_id.as_str(),
                c.secret_access_key.as_str(),
                c.session_token.as_deref()
            ),
            ("C", "D", Some("E"))
        );
        assert!(credentials_of(text, "prod").is_err_and(|e| e.contains("no such profile")));
        assert!(
            credentials_of("[x]\naws_access_key_id = A\n", "x").is_err_and(|e| e.contains("lacks"))
        );
    }
}
