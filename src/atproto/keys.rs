//! Public keys from DID documents: `Multikey` (`publicKeyMultibase` = base58btc `z` +
//! multicodec varint + compressed SEC1 point) and the legacy 2019 verification-method types,
//! whose multibase value carries the bare SEC1 point without a multicodec prefix.

use std::fmt;

/// Multicodec varint for secp256k1-pub (0xe7).
const K256_PREFIX: [u8; 2] = [0xe7, 0x01];
/// Multicodec varint for p256-pub (0x1200).
const P256_PREFIX: [u8; 2] = [0x80, 0x24];

/// An issuer's signing key; atproto allows exactly these two curves.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    K256(k256::ecdsa::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_multibase())
    }
}

/// Why a key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not base58btc multibase (must start with 'z')")]
    NotBase58Multibase,
    #[error("key is not valid base58: {0}")]
    Base58(String),
    #[error("unsupported multicodec prefix {0}")]
    UnknownCodec(String),
    #[error("{curve} key must be {expected} bytes, got {got}")]
    BadLength { curve: &'static str, expected: usize, got: usize },
    #[error("{0} key is not a valid curve point")]
    InvalidPoint(&'static str),
    #[error("unsupported verification method type {0:?}")]
    UnsupportedType(String),
}

impl KeyError {
    pub fn label(&self) -> &'static str {
        match self {
            KeyError::NotBase58Multibase => "not_multibase",
            KeyError::Base58(_) => "bad_base58",
            KeyError::UnknownCodec(_) => "unknown_codec",
            KeyError::BadLength { .. } => "bad_length",
            KeyError::InvalidPoint(_) => "invalid_point",
            KeyError::UnsupportedType(_) => "unsupported_type",
        }
    }
}

impl PublicKey {
    /// Decode a `Multikey` `publicKeyMultibase` value.
    pub fn from_multikey(s: &str) -> Result<PublicKey, KeyError> {
        let bytes = decode_base58btc(s)?;
        let (prefix, point) = bytes.split_at(bytes.len().min(2));
        if prefix == K256_PREFIX {
            compressed(point, "secp256k1")?;
            k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::K256)
                .map_err(|_| KeyError::InvalidPoint("secp256k1"))
        } else if prefix == P256_PREFIX {
            compressed(point, "P-256")?;
            p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::P256)
                .map_err(|_| KeyError::InvalidPoint("P-256"))
        } else {
            Err(KeyError::UnknownCodec(prefix.iter().map(|b| format!("{b:02x}")).collect()))
        }
    }

    /// Decode a verification method of the given `type` (as indigo accepts them).
    pub fn from_verification_method(kind: &str, multibase: &str) -> Result<PublicKey, KeyError> {
        match kind {
            "Multikey" => PublicKey::from_multikey(multibase),
            "EcdsaSecp256k1VerificationKey2019" => {
                let bytes = decode_base58btc(multibase)?;
                k256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                    .map(PublicKey::K256)
                    .map_err(|_| KeyError::InvalidPoint("secp256k1"))
            }
            "EcdsaSecp256r1VerificationKey2019" => {
                let bytes = decode_base58btc(multibase)?;
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                    .map(PublicKey::P256)
                    .map_err(|_| KeyError::InvalidPoint("P-256"))
            }
            other => Err(KeyError::UnsupportedType(other.to_string())),
        }
    }

    /// The `Multikey` encoding (compressed point); the inverse of [`PublicKey::from_multikey`].
    pub fn to_multibase(&self) -> String {
        let mut bytes = Vec::with_capacity(35);
        match self {
            PublicKey::K256(k) => {
                bytes.extend_from_slice(&K256_PREFIX);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
            PublicKey::P256(k) => {
                bytes.extend_from_slice(&P256_PREFIX);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
        }
        format!("z{}", bs58::encode(bytes).into_string())
    }

    /// The JWT `alg` this key signs with.
    pub fn jwt_alg(&self) -> &'static str {
        match self {
            PublicKey::K256(_) => "ES256K",
            PublicKey::P256(_) => "ES256",
        }
    }
}

fn decode_base58btc(s: &str) -> Result<Vec<u8>, KeyError> {
    let rest = s.strip_prefix('z').ok_or(KeyError::NotBase58Multibase)?;
    bs58::decode(rest).into_vec().map_err(|e| KeyError::Base58(e.to_string()))
}

fn compressed(point: &[u8], curve: &'static str) -> Result<(), KeyError> {
    if point.len() == 33 {
        Ok(())
    } else {
        Err(KeyError::BadLength { curve, expected: 33, got: point.len() })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::Digest;

    /// Deterministic test keys: a scalar derived from `seed`.
    pub(crate) fn k256_key(seed: &str) -> k256::ecdsa::SigningKey {
        let bytes = sha2::Sha256::digest(seed.as_bytes());
        k256::ecdsa::SigningKey::from_slice(&bytes).expect("valid k256 scalar")
    }

    pub(crate) fn p256_key(seed: &str) -> p256::ecdsa::SigningKey {
        let bytes = sha2::Sha256::digest(seed.as_bytes());
        p256::ecdsa::SigningKey::from_slice(&bytes).expect("valid p256 scalar")
    }

    #[test]
    fn multikey_round_trips_both_curves() {
        let k = PublicKey::K256(*k256_key("a").verifying_key());
        let s = k.to_multibase();
        assert!(s.starts_with("zQ3s"), "secp256k1 multikeys start with zQ3s: {s}");
        assert_eq!(PublicKey::from_multikey(&s).expect("k256"), k);
        let p = PublicKey::P256(*p256_key("a").verifying_key());
        let s = p.to_multibase();
        assert!(s.starts_with("zDn"), "P-256 multikeys start with zDn: {s}");
        assert_eq!(PublicKey::from_multikey(&s).expect("p256"), p);
        assert_eq!(k.jwt_alg(), "ES256K");
        assert_eq!(p.jwt_alg(), "ES256");
    }

    #[test]
    fn known_multikey_from_the_atproto_spec_decodes() {
        // Example keys from the atproto cryptography spec.
        let k = PublicKey::from_multikey("zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc")
            .expect("k256 example");
        assert!(matches!(k, PublicKey::K256(_)));
        let p = PublicKey::from_multikey("zDnaembgSGUhZULN2Caob4HLJPaxBh92N7rtH21TErzqf8HQo")
            .expect("p256 example");
        assert!(matches!(p, PublicKey::P256(_)));
    }

    #[test]
    fn bad_multikeys_name_the_problem() {
        let good = PublicKey::K256(*k256_key("a").verifying_key()).to_multibase();
        let raw = bs58::decode(&good[1..]).into_vec().expect("b58");
        let enc = |b: &[u8]| format!("z{}", bs58::encode(b).into_string());
        let cases: Vec<(String, &str)> = vec![
            (good[1..].to_string(), "not_multibase"),
            (format!("m{}", &good[1..]), "not_multibase"),
            ("z0OIl".to_string(), "bad_base58"),
            (enc(&[0xed, 0x01, 1, 2, 3]), "unknown_codec"),
            (enc(&[0xe7]), "unknown_codec"),
            (enc(&raw[..raw.len() - 1]), "bad_length"),
            (enc(&[&P256_PREFIX[..], &[4u8; 65][..]].concat()), "bad_length"),
            (enc(&[&K256_PREFIX[..], &[9u8; 33][..]].concat()), "invalid_point"),
            (String::new(), "not_multibase"),
        ];
        for (input, label) in cases {
            let err = PublicKey::from_multikey(&input).expect_err("must fail");
            assert_eq!(err.label(), label, "{input:?}: {err}");
        }
    }

    #[test]
    fn legacy_types_carry_bare_points() {
        let k = k256_key("legacy");
        let uncompressed = k.verifying_key().to_encoded_point(false);
        let mb = format!("z{}", bs58::encode(uncompressed.as_bytes()).into_string());
        let got = PublicKey::from_verification_method("EcdsaSecp256k1VerificationKey2019", &mb)
            .expect("legacy k256");
        assert_eq!(got, PublicKey::K256(*k.verifying_key()));

        let p = p256_key("legacy");
        let compressed = p.verifying_key().to_encoded_point(true);
        let mb = format!("z{}", bs58::encode(compressed.as_bytes()).into_string());
        let got = PublicKey::from_verification_method("EcdsaSecp256r1VerificationKey2019", &mb)
            .expect("legacy p256");
        assert_eq!(got, PublicKey::P256(*p.verifying_key()));

        let err =
            PublicKey::from_verification_method("Ed25519VerificationKey2020", &mb).expect_err("unsupported");
        assert_eq!(err.label(), "unsupported_type");
    }
}
