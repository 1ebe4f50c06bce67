//! Agent tokens: the file they are read from, and the interceptor that
//! checks the `authorization: Bearer <token>` metadata of every call.
//!
//! The token file has one token per line. A line `name:token` gives the
//! token a name (shown in logs, and the owner of the sessions registered
//! with it); a line with just `token` is named after its line number.
//! Blank lines and lines starting with `#` are ignored. Tokens are at least
//! [`MIN_TOKEN_LEN`] characters, contain no whitespace and no `:`.
//!
//! Invariants: tokens are kept only as SHA-256 digests, and a presented
//! token is compared with every one of them in constant time, so neither
//! the comparison's duration nor an early exit tells how much of a guess
//! was right. An unauthenticated call never reaches a handler.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;
use tonic::{Request, Status};

/// Shorter tokens are refused when the file is read.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why the token file could not be used.
#[derive(Debug, Error)]
pub enum TokenFileError {
    #[error("reading the agent token file '{path}': {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent token file, line {line}: {problem}")]
    Invalid { line: usize, problem: &'static str },
    #[error("the agent token file has no tokens: no agent could connect")]
    Empty,
}

struct Token {
    name: Arc<str>,
    digest: [u8; 32],
}

/// The tokens agents may present.
pub struct Tokens {
    tokens: Vec<Token>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|t| &*t.name).collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn from_file(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Tokens::parse(&text)
    }

    /// Parses the file format described in the module documentation.
    pub fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let invalid = |problem| TokenFileError::Invalid {
                line: line_no,
                problem,
            };
            let (name, token) = match line.split_once(':') {
                Some((name, token)) => (name.trim().to_owned(), token.trim()),
                None => (format!("token-line-{line_no}"), line),
            };
            if name.is_empty() {
                return Err(invalid("empty name before ':'"));
            }
            if token.contains(':') || token.chars().any(char::is_whitespace) {
                return Err(invalid("a token may contain neither ':' nor whitespace"));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(invalid("token shorter than 16 characters"));
            }
            tokens.push(Token {
                name: name.into(),
                digest: digest(token),
            });
        }
        if tokens.is_empty() {
            return Err(TokenFileError::Empty);
        }
        Ok(Tokens { tokens })
    }

    /// The name of the token `presented`, if it is one of ours.
    pub fn check(&self, presented: &str) -> Option<Arc<str>> {
        let presented = digest(presented);
        let mut found = None;
        for token in &self.tokens {
            // Every token is compared, whatever matched before.
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token.name.clone());
            }
        }
        found
    }
}

/// Who made a call: the name of the token it carried. Handlers read it
/// from the request's extensions; a session belongs to the identity that
/// registered it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AgentIdentity(pub Arc<str>);

/// Reads the identity the interceptor attached; its absence is a bug in
/// how the service was assembled, reported as an internal error.
pub(crate) fn identity<T>(request: &Request<T>) -> Result<AgentIdentity, Status> {
    request
        .extensions()
        .get::<AgentIdentity>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not authenticated"))
}

/// The tonic interceptor that authenticates every call.
#[derive(Clone)]
pub(crate) struct Authenticate {
    tokens: Arc<Tokens>,
}

impl Authenticate {
    pub(crate) fn new(tokens: Arc<Tokens>) -> Authenticate {
        Authenticate { tokens }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        match self.identify(&request) {
            Ok(name) => {
                request.extensions_mut().insert(AgentIdentity(name));
                Ok(request)
            }
            Err(reason) => {
                // Every refusal is logged with its peer and reason, never
                // with the token that was presented.
                let peer = request
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "unknown".into());
                tracing::warn!(%peer, "agent refused: {reason}");
                Err(Status::unauthenticated(reason))
            }
        }
    }
}

impl Authenticate {
    /// The name of the token the call carries, or why it is refused.
    fn identify(&self, request: &Request<()>) -> Result<Arc<str>, &'static str> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or("no agent token: the call has no 'authorization: Bearer <token>' metadata")?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or("no agent token: the authorization metadata is not 'Bearer <token>'")?;
        self.tokens
            .check(token.trim())
            .ok_or("unknown agent token: it is not in the queue runner's --agent-token-file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_bare_tokens_are_recognised() {
        let tokens =
            Tokens::parse("# agents\n\nbuilder1:aaaaaaaaaaaaaaaaaaaa\n  bbbbbbbbbbbbbbbbbbbb  \n")
                .expect("parses");
        assert_eq!(
            tokens.check("aaaaaaaaaaaaaaaaaaaa").as_deref(),
            Some("builder1")
        );
        assert_eq!(
            tokens.check("bbbbbbbbbbbbbbbbbbbb").as_deref(),
            Some("token-line-4")
        );
        assert_eq!(tokens.check("aaaaaaaaaaaaaaaaaaab"), None);
        assert_eq!(tokens.check(""), None);
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let err = |text: &str| Tokens::parse(text).err().map(|e| e.to_string());
        assert_eq!(
            err("ok:aaaaaaaaaaaaaaaaaaaa\nshort\n").as_deref(),
            Some("agent token file, line 2: token shorter than 16 characters")
        );
        assert!(err(":aaaaaaaaaaaaaaaaaaaa").is_some());
        assert!(err("a:b:cccccccccccccccccccc").is_some());
        assert!(err("a:bbbbbbbb bbbbbbbbbbbbbb").is_some());
        assert!(matches!(
            Tokens::parse("# nothing\n"),
            Err(TokenFileError::Empty)
        ));
    }
}
