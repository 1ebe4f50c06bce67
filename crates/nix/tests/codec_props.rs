//! Property tests of the small codecs: nix32, hashes in every base, and
//! store path parsing. Round trips hold, and no input panics.

#![allow(clippy::unwrap_used)]

use proptest::collection::vec;
use proptest::prelude::*;
use sluice_nix::base32;
use sluice_nix::hash::{Base, Hash, HashAlgo};
use sluice_nix::store_path::{StoreDir, StorePath};

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop_oneof![
        Just(HashAlgo::Md5),
        Just(HashAlgo::Sha1),
        Just(HashAlgo::Sha256),
        Just(HashAlgo::Sha512)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn nix32_round_trips(bytes in vec(any::<u8>(), 0..80)) {
        let s = base32::encode(&bytes);
        prop_assert_eq!(s.len(), base32::encoded_len(bytes.len()));
        prop_assert!(s.bytes().all(|c| base32::ALPHABET.contains(&c)));
        prop_assert_eq!(base32::decode(s.as_bytes()), Ok(bytes));
    }

    /// Whatever decodes is canonical: it encodes back to the same string.
    #[test]
    fn nix32_decode_is_canonical(s in "[0-9a-z]{0,60}") {
        if let Ok(bytes) = base32::decode(s.as_bytes()) {
            prop_assert_eq!(base32::encode(&bytes), s);
        }
    }

    #[test]
    fn nix32_decode_never_panics(bytes in vec(any::<u8>(), 0..80)) {
        let _ = base32::decode(&bytes);
    }

    #[test]
    fn hashes_round_trip_in_every_base(algo in algo(), digest in vec(any::<u8>(), 64)) {
        let h = Hash::from_digest(algo, &digest[..algo.size()]).expect("right size");
        for base in [Base::Base16, Base::Nix32, Base::Base64, Base::Sri] {
            prop_assert_eq!(Hash::parse_prefixed(&h.format(base, true)), Ok(h));
            if base != Base::Sri {
                prop_assert_eq!(Hash::parse_unprefixed(&h.format(base, false), algo), Ok(h));
            }
        }
        prop_assert_eq!(Hash::parse_sri(&h.to_sri()), Ok(h));
    }

    #[test]
    fn hash_parsing_never_panics(s in "(?s).{0,140}", algo in algo()) {
        let _ = Hash::parse_any(&s, Some(algo));
        let _ = Hash::parse_any(&s, None);
        let _ = Hash::parse_sri(&s);
        let _ = Hash::parse_unprefixed(&s, algo);
    }

    #[test]
    fn store_paths_round_trip(digest in any::<[u8; 20]>(), name in "[a-zA-Z0-9+_?=][a-zA-Z0-9+._?=-]{0,210}") {
        let dir = StoreDir::default();
        let p = StorePath::from_digest(&digest, &name).expect("valid name");
        prop_assert_eq!(p.digest(), digest);
        prop_assert_eq!(p.name(), name.as_str());
        prop_assert_eq!(dir.parse_path(&dir.print(&p)), Ok(p));
    }

    #[test]
    fn store_path_parsing_never_panics(s in "(?s).{0,300}") {
        let dir = StoreDir::default();
        let _ = dir.parse_path(&s);
        let _ = StorePath::from_base_name(&s);
    }
}
