//! Nix's own base-32 ("nix32"): the encoding of store path hash parts and of
//! `sha256:1abc…` hashes.
//!
//! It is not RFC 4648 base32. The alphabet is `0123456789abcdfghijklmnpqrsvwxyz`
//! (no `e`, `o`, `u`, `t`), and the bits are taken least significant first
//! from the end of the byte string: the first character of the encoding holds
//! the highest 5-bit group of the last byte. An `n`-byte input always encodes to
//! [`encoded_len`]`(n)` characters and no padding.
//!
//! Invariants: `decode(encode(b)) == b` for every byte string, and `decode`
//! accepts exactly the strings `encode` can produce (a correct length and zero
//! bits in the unused high end), so every byte string has one encoding.

use thiserror::Error;

/// The 32 digits, by value.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

const INVALID: u8 = 0xff;

/// Digit value of each byte, or [`INVALID`].
const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 32 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a string is not the nix32 encoding of some bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("invalid nix32 character {char:?} at offset {offset}")]
    InvalidChar { offset: usize, char: char },
    #[error("{len} characters is not the length of any nix32 encoding")]
    InvalidLength { len: usize },
    #[error("nix32 string has non-zero bits beyond its last byte")]
    NonZeroPadding,
}

/// Number of characters in the encoding of `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Number of bytes an encoding of `len` characters decodes to; only
/// meaningful if `encoded_len(decoded_len(len)) == len`.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Whether `c` is a nix32 digit.
#[inline]
pub fn is_digit(c: u8) -> bool {
    DECODE[c as usize] != INVALID
}

/// Appends the encoding of `bytes` to `out`.
pub fn encode_into(bytes: &[u8], out: &mut String) {
    let len = encoded_len(bytes.len());
    out.reserve(len);
    for n in (0..len).rev() {
        out.push(char::from(ALPHABET[digit_at(bytes, n) as usize]));
    }
}

/// The nix32 encoding of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(encoded_len(bytes.len()));
    encode_into(bytes, &mut s);
    s
}

/// Writes the encoding of `bytes` into `out`, which must be exactly
/// `encoded_len(bytes.len())` long (used to build store paths without
/// allocating).
pub(crate) fn encode_to_slice(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), encoded_len(bytes.len()));
    let len = out.len();
    for (pos, n) in (0..len).rev().enumerate() {
        out[pos] = ALPHABET[digit_at(bytes, n) as usize];
    }
}

/// The `n`-th 5-bit group, counting from the least significant bits of
/// `bytes[0]`.
#[inline]
fn digit_at(bytes: &[u8], n: usize) -> u8 {
    let b = n * 5;
    let i = b / 8;
    let j = b % 8;
    let low = bytes[i] >> j;
    let high = match bytes.get(i + 1) {
        Some(&next) if j > 3 => next << (8 - j),
        _ => 0,
    };
    (low | high) & 0x1f
}

/// Decodes a nix32 string.
pub fn decode(s: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let size = decoded_len(s.len());
    if encoded_len(size) != s.len() {
        return Err(DecodeError::InvalidLength { len: s.len() });
    }
    let mut out = vec![0u8; size];
    decode_into(s, &mut out)?;
    Ok(out)
}

/// Decodes `s` into `out`, whose length must be `decoded_len(s.len())` and
/// which must be zeroed.
pub(crate) fn decode_into(s: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let size = out.len();
    if encoded_len(size) != s.len() {
        return Err(DecodeError::InvalidLength { len: s.len() });
    }
    for (n, &c) in s.iter().rev().enumerate() {
        let digit = DECODE[c as usize];
        if digit == INVALID {
            let offset = s.len() - n - 1;
            return Err(DecodeError::InvalidChar {
                offset,
                char: invalid_char(s, offset),
            });
        }
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = if j > 3 { digit >> (8 - j) } else { 0 };
        if i + 1 < size {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(())
}

/// The character at `offset` for an error message: the UTF-8 character that
/// starts there if any, else the byte as a Latin-1 character.
fn invalid_char(s: &[u8], offset: usize) -> char {
    let end = (offset + 4).min(s.len());
    let tail = &s[offset..end];
    let valid = match std::str::from_utf8(tail) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&tail[..e.valid_up_to()]).unwrap_or(""),
    };
    valid
        .chars()
        .next()
        .unwrap_or(char::from(s.get(offset).copied().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // sha256("") in nix32, as printed by `nix hash to-base32`.
        let empty = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .expect("valid hex");
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0xff]), "7z");
        assert_eq!(decode(b"7z"), Ok(vec![0xff]));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode(b"e0"),
            Err(DecodeError::InvalidChar {
                offset: 0,
                char: 'e'
            })
        );
        assert_eq!(decode(b"1"), Err(DecodeError::InvalidLength { len: 1 }));
        // "80" would need a ninth bit in a one-byte string.
        assert_eq!(decode(b"80"), Err(DecodeError::NonZeroPadding));
        assert!(matches!(
            decode("é0".as_bytes()),
            Err(DecodeError::InvalidLength { .. }) | Err(DecodeError::InvalidChar { .. })
        ));
    }
}
