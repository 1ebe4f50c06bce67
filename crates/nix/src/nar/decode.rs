//! The NAR decoder: a pure, push-fed state machine that turns chunks of a
//! NAR into [`NarEvent`]s.
//!
//! The caller hands [`NarDecoder::decode`] whatever bytes it has; the decoder
//! consumes some of them and returns at most one event. It never reads past
//! the end of the archive, so a NAR embedded in a larger stream (the daemon
//! protocol) leaves the bytes after it untouched.
//!
//! Invariants: the decoder never allocates more than the bounds of
//! [`NarLimits`] allow (one token of at most 4 KiB, one name per open
//! directory); file contents are returned as slices of the input; after an
//! error every further call returns that error.

use thiserror::Error;

use super::{is_valid_entry_name, padding, NarLimits, MAX_TAG_LEN, NAR_MAGIC};

/// One step of a NAR, in archive order. A node is `File` `Contents`*
/// `FileEnd`, or `Symlink`, or `Directory` (`Entry` node `EntryEnd`)*
/// `DirectoryEnd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarEvent<'a> {
    /// A regular file starts; `size` bytes of [`NarEvent::Contents`] follow.
    File { executable: bool, size: u64 },
    /// The next piece of the current file's contents (never empty).
    Contents(&'a [u8]),
    /// The current file is complete.
    FileEnd,
    /// A symlink; always complete in itself.
    Symlink { target: &'a [u8] },
    /// A directory starts.
    Directory,
    /// An entry of the current directory starts; its node follows. Names
    /// are valid ([`super::is_valid_entry_name`]) and strictly increasing.
    Entry { name: &'a [u8] },
    /// The current entry's node is complete.
    EntryEnd,
    /// The current directory is complete.
    DirectoryEnd,
}

/// A [`NarEvent`] that owns its bytes, to send between tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedNarEvent {
    File { executable: bool, size: u64 },
    Contents(Vec<u8>),
    FileEnd,
    Symlink { target: Vec<u8> },
    Directory,
    Entry { name: Vec<u8> },
    EntryEnd,
    DirectoryEnd,
}

impl NarEvent<'_> {
    pub fn to_owned_event(&self) -> OwnedNarEvent {
        match *self {
            NarEvent::File { executable, size } => OwnedNarEvent::File { executable, size },
            NarEvent::Contents(c) => OwnedNarEvent::Contents(c.to_vec()),
            NarEvent::FileEnd => OwnedNarEvent::FileEnd,
            NarEvent::Symlink { target } => OwnedNarEvent::Symlink {
                target: target.to_vec(),
            },
            NarEvent::Directory => OwnedNarEvent::Directory,
            NarEvent::Entry { name } => OwnedNarEvent::Entry {
                name: name.to_vec(),
            },
            NarEvent::EntryEnd => OwnedNarEvent::EntryEnd,
            NarEvent::DirectoryEnd => OwnedNarEvent::DirectoryEnd,
        }
    }
}

impl OwnedNarEvent {
    pub fn as_event(&self) -> NarEvent<'_> {
        match self {
            OwnedNarEvent::File { executable, size } => NarEvent::File {
                executable: *executable,
                size: *size,
            },
            OwnedNarEvent::Contents(c) => NarEvent::Contents(c),
            OwnedNarEvent::FileEnd => NarEvent::FileEnd,
            OwnedNarEvent::Symlink { target } => NarEvent::Symlink { target },
            OwnedNarEvent::Directory => NarEvent::Directory,
            OwnedNarEvent::Entry { name } => NarEvent::Entry { name },
            OwnedNarEvent::EntryEnd => NarEvent::EntryEnd,
            OwnedNarEvent::DirectoryEnd => NarEvent::DirectoryEnd,
        }
    }
}

/// Why bytes are not a NAR. Offsets count bytes from the start of the
/// archive and point at the offending string.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarError {
    #[error("not a NAR: it does not start with '{NAR_MAGIC}'")]
    BadMagic,
    #[error("malformed NAR at byte {offset}: expected {expected}, found {found:?}")]
    UnexpectedTag {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("malformed NAR at byte {offset}: unknown file type {found:?}")]
    UnknownType { offset: u64, found: String },
    #[error("malformed NAR at byte {offset}: {what} of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("malformed NAR at byte {offset}: non-zero padding")]
    NonZeroPadding { offset: u64 },
    #[error("malformed NAR at byte {offset}: invalid entry name {name:?}")]
    InvalidName { offset: u64, name: String },
    #[error("malformed NAR at byte {offset}: entry {name:?} is not after {previous:?} (entries must be sorted)")]
    UnsortedEntries {
        offset: u64,
        name: String,
        previous: String,
    },
    #[error("malformed NAR at byte {offset}: duplicate entry {name:?}")]
    DuplicateEntry { offset: u64, name: String },
    #[error("malformed NAR at byte {offset}: symlink target is empty or contains NUL")]
    InvalidSymlinkTarget { offset: u64 },
    #[error("malformed NAR at byte {offset}: directories nested deeper than {max}")]
    TooDeep { offset: u64, max: usize },
    #[error("truncated NAR: it ends after {offset} bytes, in the middle of the archive")]
    Truncated { offset: u64 },
}

impl NarError {
    /// Where in the archive the problem starts.
    pub fn offset(&self) -> u64 {
        match self {
            NarError::BadMagic => 0,
            NarError::UnexpectedTag { offset, .. }
            | NarError::UnknownType { offset, .. }
            | NarError::StringTooLong { offset, .. }
            | NarError::NonZeroPadding { offset }
            | NarError::InvalidName { offset, .. }
            | NarError::UnsortedEntries { offset, .. }
            | NarError::DuplicateEntry { offset, .. }
            | NarError::InvalidSymlinkTarget { offset }
            | NarError::TooDeep { offset, .. }
            | NarError::Truncated { offset } => *offset,
        }
    }
}

/// Lossy, shortened rendering of attacker-controlled bytes for messages.
fn show(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
    if bytes.len() > 64 {
        s + "…"
    } else {
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Magic,
    NodeOpen,
    NodeType,
    NodeTypeValue,
    RegularTag,
    ExecutableMarker,
    ContentsTag,
    ContentsSize,
    Contents { remaining: u64 },
    ContentsPadding { pad: usize },
    RegularClose,
    SymlinkTag,
    SymlinkTarget,
    SymlinkClose,
    DirectoryTag,
    EntryOpen,
    EntryNameTag,
    EntryName,
    EntryNodeTag,
    EntryClose,
    Done,
}

/// What a step produced, before it is tied to the token buffer or input.
#[derive(Debug, Clone, Copy)]
enum Produced {
    File { executable: bool, size: u64 },
    Contents { start: usize, end: usize },
    FileEnd,
    Symlink { len: usize },
    Directory,
    Entry { len: usize },
    EntryEnd,
    DirectoryEnd,
}

/// The push parser. See the module documentation.
#[derive(Debug, Clone)]
pub struct NarDecoder {
    limits: NarLimits,
    state: State,
    /// The string being read: its 8-byte length, data and padding.
    token: Vec<u8>,
    /// The token is complete; the next read starts a new one.
    token_complete: bool,
    token_start: u64,
    /// Bytes consumed before the current `decode` call.
    pos: u64,
    /// Last entry name of each open directory (empty: none yet).
    dirs: Vec<Vec<u8>>,
    executable: bool,
    file_size: u64,
    error: Option<NarError>,
}

impl Default for NarDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Result of offering bytes to a token reader.
enum Take {
    /// More input is needed; everything offered was consumed.
    Partial,
    /// The token is complete; its data is `token[8..8 + len]`.
    Complete { len: usize },
}

impl NarDecoder {
    pub fn new() -> Self {
        Self::with_limits(NarLimits::default())
    }

    pub fn with_limits(limits: NarLimits) -> Self {
        NarDecoder {
            limits,
            state: State::Magic,
            token: Vec::with_capacity(64),
            token_complete: false,
            token_start: 0,
            pos: 0,
            dirs: Vec::new(),
            executable: false,
            file_size: 0,
            error: None,
        }
    }

    /// The whole archive has been decoded; further input is not consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Call at the end of the input: an error unless the archive is complete.
    pub fn finish(&self) -> Result<(), NarError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.state == State::Done {
            Ok(())
        } else {
            Err(NarError::Truncated { offset: self.pos })
        }
    }

    /// Consumes a prefix of `input` and returns its length together with the
    /// event it completed, if any. Returns `(input.len(), None)` when all of
    /// it was consumed without completing an event, and `(0, None)` once the
    /// archive is done.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<NarEvent<'a>>), NarError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut used = 0;
        let mut produced = None;
        while used < input.len() && self.state != State::Done && produced.is_none() {
            match self.step(&input[used..], used) {
                Ok((n, p)) => {
                    used += n;
                    produced = p;
                }
                Err(e) => {
                    self.error = Some(e.clone());
                    return Err(e);
                }
            }
        }
        self.pos += used as u64;
        let event = produced.map(|p| match p {
            Produced::File { executable, size } => NarEvent::File { executable, size },
            Produced::Contents { start, end } => NarEvent::Contents(&input[start..end]),
            Produced::FileEnd => NarEvent::FileEnd,
            Produced::Symlink { len } => NarEvent::Symlink {
                target: &self.token[8..8 + len],
            },
            Produced::Directory => NarEvent::Directory,
            Produced::Entry { len } => NarEvent::Entry {
                name: &self.token[8..8 + len],
            },
            Produced::EntryEnd => NarEvent::EntryEnd,
            Produced::DirectoryEnd => NarEvent::DirectoryEnd,
        });
        Ok((used, event))
    }

    /// Feeds all of `input`, passing each event to `on_event`; returns how
    /// many bytes belonged to the archive (less than `input.len()` only if
    /// the archive ended inside it).
    pub fn feed<E>(
        &mut self,
        mut input: &[u8],
        mut on_event: impl FnMut(NarEvent<'_>) -> Result<(), E>,
    ) -> Result<usize, FeedError<E>> {
        let total = input.len();
        while !input.is_empty() {
            let (n, event) = self.decode(input).map_err(FeedError::Nar)?;
            if let Some(event) = event {
                on_event(event).map_err(FeedError::Sink)?;
            } else if n == 0 {
                break;
            }
            input = &input[n..];
        }
        Ok(total - input.len())
    }

    /// Offset of the byte at `at` in the current call's input.
    fn offset(&self, at: usize) -> u64 {
        self.pos + at as u64
    }

    /// Reads (part of) a string of at most `max` bytes from `input`, which
    /// starts at `at` in the current call's input.
    fn take_string(
        &mut self,
        input: &[u8],
        at: usize,
        max: usize,
        what: &'static str,
    ) -> Result<(usize, Take), NarError> {
        if self.token_complete {
            self.token.clear();
            self.token_complete = false;
        }
        let mut used = 0;
        if self.token.len() < 8 {
            if self.token.is_empty() {
                self.token_start = self.offset(at);
            }
            let n = (8 - self.token.len()).min(input.len());
            self.token.extend_from_slice(&input[..n]);
            used += n;
            if self.token.len() < 8 {
                return Ok((used, Take::Partial));
            }
            let len = self.token_len();
            if len > max as u64 {
                return Err(NarError::StringTooLong {
                    offset: self.token_start,
                    what,
                    len,
                    max,
                });
            }
        }
        // Bounded by `max` above.
        let len = self.token_len() as usize;
        let total = 8 + len + padding(len as u64);
        let n = (total - self.token.len()).min(input.len() - used);
        self.token.extend_from_slice(&input[used..used + n]);
        used += n;
        if self.token.len() < total {
            return Ok((used, Take::Partial));
        }
        self.token_complete = true;
        if self.token[8 + len..].iter().any(|&b| b != 0) {
            return Err(NarError::NonZeroPadding {
                offset: self.token_start + 8 + len as u64,
            });
        }
        Ok((used, Take::Complete { len }))
    }

    fn token_len(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.token[..8]);
        u64::from_le_bytes(b)
    }

    /// Reads a keyword; `Some(keyword)` once complete.
    fn take_tag(&mut self, input: &[u8], at: usize) -> Result<(usize, Option<&[u8]>), NarError> {
        match self.take_string(input, at, MAX_TAG_LEN, "keyword")? {
            (n, Take::Partial) => Ok((n, None)),
            (n, Take::Complete { len }) => Ok((n, Some(&self.token[8..8 + len]))),
        }
    }

    /// Reads a keyword that must be `tag`; true once it was read.
    fn expect(
        &mut self,
        input: &[u8],
        at: usize,
        tag: &'static [u8],
        expected: &'static str,
    ) -> Result<(usize, bool), NarError> {
        match self.take_tag(input, at)? {
            (n, None) => Ok((n, false)),
            (n, Some(t)) if t == tag => Ok((n, true)),
            (_, Some(_)) => Err(self.unexpected(expected)),
        }
    }

    fn unexpected(&self, expected: &'static str) -> NarError {
        NarError::UnexpectedTag {
            offset: self.token_start,
            expected,
            found: show(&self.token[8..8 + self.token_len() as usize]),
        }
    }

    /// A node is complete: back to its directory entry, or done.
    fn node_finished(&mut self) {
        self.state = if self.dirs.is_empty() {
            State::Done
        } else {
            State::EntryClose
        };
    }

    /// One transition; `input` is non-empty and starts at `at`.
    fn step(&mut self, input: &[u8], at: usize) -> Result<(usize, Option<Produced>), NarError> {
        match self.state {
            State::Done => Ok((0, None)),
            State::Magic => {
                let (n, take) = match self.take_string(input, at, NAR_MAGIC.len(), "magic") {
                    Err(NarError::StringTooLong { .. }) => return Err(NarError::BadMagic),
                    r => r?,
                };
                if let Take::Complete { len } = take {
                    if &self.token[8..8 + len] != NAR_MAGIC.as_bytes() {
                        return Err(NarError::BadMagic);
                    }
                    self.state = State::NodeOpen;
                }
                Ok((n, None))
            }
            State::NodeOpen => {
                if self.dirs.len() >= self.limits.max_depth {
                    return Err(NarError::TooDeep {
                        offset: self.offset(at),
                        max: self.limits.max_depth,
                    });
                }
                self.expect_then(input, at, b"(", "'('", State::NodeType)
            }
            State::NodeType => self.expect_then(input, at, b"type", "'type'", State::NodeTypeValue),
            State::NodeTypeValue => {
                let (n, tag) = self.take_tag(input, at)?;
                let Some(tag) = tag else { return Ok((n, None)) };
                match tag {
                    b"regular" => {
                        self.executable = false;
                        self.state = State::RegularTag;
                        Ok((n, None))
                    }
                    b"symlink" => {
                        self.state = State::SymlinkTag;
                        Ok((n, None))
                    }
                    b"directory" => {
                        self.dirs.push(Vec::new());
                        self.state = State::DirectoryTag;
                        Ok((n, Some(Produced::Directory)))
                    }
                    other => {
                        let found = show(other);
                        Err(NarError::UnknownType {
                            offset: self.token_start,
                            found,
                        })
                    }
                }
            }
            State::RegularTag => {
                let (n, tag) = self.take_tag(input, at)?;
                let Some(tag) = tag else { return Ok((n, None)) };
                match tag {
                    b"executable" => self.state = State::ExecutableMarker,
                    b"contents" => self.state = State::ContentsSize,
                    _ => return Err(self.unexpected("'executable' or 'contents'")),
                }
                Ok((n, None))
            }
            State::ExecutableMarker => {
                let (n, take) = self.take_string(input, at, 0, "executable marker")?;
                if let Take::Complete { .. } = take {
                    self.executable = true;
                    self.state = State::ContentsTag;
                }
                Ok((n, None))
            }
            State::ContentsTag => {
                self.expect_then(input, at, b"contents", "'contents'", State::ContentsSize)
            }
            State::ContentsSize => {
                if self.token_complete {
                    self.token.clear();
                    self.token_complete = false;
                }
                if self.token.is_empty() {
                    self.token_start = self.offset(at);
                }
                let n = (8 - self.token.len()).min(input.len());
                self.token.extend_from_slice(&input[..n]);
                if self.token.len() < 8 {
                    return Ok((n, None));
                }
                let size = self.token_len();
                self.token_complete = true;
                self.file_size = size;
                self.state = if size == 0 {
                    State::RegularClose
                } else {
                    State::Contents { remaining: size }
                };
                Ok((
                    n,
                    Some(Produced::File {
                        executable: self.executable,
                        size,
                    }),
                ))
            }
            State::Contents { remaining } => {
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                let remaining = remaining - n as u64;
                self.state = if remaining > 0 {
                    State::Contents { remaining }
                } else {
                    match padding(self.file_size) {
                        0 => State::RegularClose,
                        pad => State::ContentsPadding { pad },
                    }
                };
                Ok((
                    n,
                    Some(Produced::Contents {
                        start: at,
                        end: at + n,
                    }),
                ))
            }
            State::ContentsPadding { pad } => {
                let n = pad.min(input.len());
                if let Some(i) = input[..n].iter().position(|&b| b != 0) {
                    return Err(NarError::NonZeroPadding {
                        offset: self.offset(at + i),
                    });
                }
                self.state = if n == pad {
                    State::RegularClose
                } else {
                    State::ContentsPadding { pad: pad - n }
                };
                Ok((n, None))
            }
            State::RegularClose => {
                let (n, done) = self.expect(input, at, b")", "')'")?;
                if !done {
                    return Ok((n, None));
                }
                self.node_finished();
                Ok((n, Some(Produced::FileEnd)))
            }
            State::SymlinkTag => {
                self.expect_then(input, at, b"target", "'target'", State::SymlinkTarget)
            }
            State::SymlinkTarget => {
                let max = self.limits.max_target_len;
                let (n, take) = self.take_string(input, at, max, "symlink target")?;
                let Take::Complete { len } = take else {
                    return Ok((n, None));
                };
                let target = &self.token[8..8 + len];
                if target.is_empty() || target.contains(&0) {
                    return Err(NarError::InvalidSymlinkTarget {
                        offset: self.token_start,
                    });
                }
                self.state = State::SymlinkClose;
                Ok((n, Some(Produced::Symlink { len })))
            }
            State::SymlinkClose => {
                let (n, done) = self.expect(input, at, b")", "')'")?;
                if done {
                    self.node_finished();
                }
                Ok((n, None))
            }
            State::DirectoryTag => {
                let (n, tag) = self.take_tag(input, at)?;
                let Some(tag) = tag else { return Ok((n, None)) };
                match tag {
                    b"entry" => {
                        self.state = State::EntryOpen;
                        Ok((n, None))
                    }
                    b")" => {
                        self.dirs.pop();
                        self.node_finished();
                        Ok((n, Some(Produced::DirectoryEnd)))
                    }
                    _ => Err(self.unexpected("'entry' or ')'")),
                }
            }
            State::EntryOpen => self.expect_then(input, at, b"(", "'('", State::EntryNameTag),
            State::EntryNameTag => self.expect_then(input, at, b"name", "'name'", State::EntryName),
            State::EntryName => {
                let max = self.limits.max_name_len;
                let (n, take) = self.take_string(input, at, max, "entry name")?;
                let Take::Complete { len } = take else {
                    return Ok((n, None));
                };
                self.check_entry_name(len)?;
                self.state = State::EntryNodeTag;
                Ok((n, Some(Produced::Entry { len })))
            }
            State::EntryNodeTag => self.expect_then(input, at, b"node", "'node'", State::NodeOpen),
            State::EntryClose => {
                let (n, done) = self.expect(input, at, b")", "')'")?;
                if !done {
                    return Ok((n, None));
                }
                self.state = State::DirectoryTag;
                Ok((n, Some(Produced::EntryEnd)))
            }
        }
    }

    /// Reads keyword `tag`, then moves to `next`.
    fn expect_then(
        &mut self,
        input: &[u8],
        at: usize,
        tag: &'static [u8],
        expected: &'static str,
        next: State,
    ) -> Result<(usize, Option<Produced>), NarError> {
        let (n, done) = self.expect(input, at, tag, expected)?;
        if done {
            self.state = next;
        }
        Ok((n, None))
    }

    /// Validates the entry name in the token against the directory's last.
    fn check_entry_name(&mut self, len: usize) -> Result<(), NarError> {
        let offset = self.token_start;
        let name = &self.token[8..8 + len];
        if !is_valid_entry_name(name) {
            return Err(NarError::InvalidName {
                offset,
                name: show(name),
            });
        }
        let Some(last) = self.dirs.last_mut() else {
            // Entries are only read inside a directory frame.
            return Err(NarError::UnexpectedTag {
                offset,
                expected: "an entry inside a directory",
                found: show(name),
            });
        };
        if !last.is_empty() {
            match name.cmp(last.as_slice()) {
                std::cmp::Ordering::Greater => {}
                std::cmp::Ordering::Equal => {
                    return Err(NarError::DuplicateEntry {
                        offset,
                        name: show(name),
                    })
                }
                std::cmp::Ordering::Less => {
                    return Err(NarError::UnsortedEntries {
                        offset,
                        name: show(name),
                        previous: show(last),
                    })
                }
            }
        }
        last.clear();
        last.extend_from_slice(name);
        Ok(())
    }
}

/// An error from [`NarDecoder::feed`]: the archive's, or the event sink's.
#[derive(Debug, Error)]
pub enum FeedError<E> {
    #[error(transparent)]
    Nar(NarError),
    #[error("handling a NAR event failed: {0}")]
    Sink(E),
}
