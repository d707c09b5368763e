//! Service-auth JWT parsing and checks, pure: decoding the compact form, the claim rules of
//! spec §6.4 (aud, exp, iat, nbf, lxm with 5 s leeway) and the ES256K/ES256 signature check.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};

use super::AuthError;
use crate::atproto::PublicKey;
use crate::atproto::did::is_valid_did;

/// Leeway for every time check, as indigo's validator.
pub const LEEWAY_SECS: i64 = 5;

/// The two algorithms atproto allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Es256k,
    Es256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::Es256k => "ES256K",
            Alg::Es256 => "ES256",
        }
    }
}

/// The claims we use, after type checks.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
    pub nbf: Option<i64>,
    pub lxm: Option<String>,
    pub jti: Option<String>,
}

/// A decoded token whose signature has not been checked yet.
#[derive(Debug, Clone)]
pub struct UnverifiedToken<'a> {
    pub alg: Alg,
    pub claims: Claims,
    /// `base64url(header).base64url(payload)`: the signed bytes.
    pub signing_input: &'a str,
    pub signature: [u8; 64],
}

/// Take the token from an `Authorization` header value: `Bearer ` is stripped if present,
/// otherwise the whole value is the token (as Go).
pub fn token_from_header(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::MissingToken)?;
    let token = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    if token.is_empty() { Err(AuthError::MissingToken) } else { Ok(token) }
}

/// Decode the compact form and type-check header and claims.
pub fn decode(token: &str) -> Result<UnverifiedToken<'_>, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(malformed("token contains an invalid number of segments"));
    };
    let header = json_segment(h, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) if a == "ES256K" => Alg::Es256k,
        Some(Value::String(a)) if a == "ES256" => Alg::Es256,
        Some(Value::String(a)) => return Err(AuthError::UnsupportedAlg(a.clone())),
        _ => return Err(AuthError::UnsupportedAlg("<missing>".into())),
    };
    let payload = json_segment(p, "claims")?;
    let claims = claims(&payload)?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| malformed(&format!("could not base64 decode signature: {e}")))?;
    let signature: [u8; 64] = sig
        .as_slice()
        .try_into()
        .map_err(|_| AuthError::BadSignature(format!("signature must be 64 bytes, got {}", sig.len())))?;
    let signing_input = &token[..h.len() + 1 + p.len()];
    Ok(UnverifiedToken { alg, claims, signing_input, signature })
}

fn malformed(why: &str) -> AuthError {
    AuthError::Malformed(why.to_string())
}

fn json_segment(seg: &str, what: &str) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(seg)
        .map_err(|e| malformed(&format!("could not base64 decode {what}: {e}")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(malformed(&format!("{what} is not a JSON object"))),
        Err(e) => Err(malformed(&format!("could not JSON decode {what}: {e}"))),
    }
}

fn claims(m: &Map<String, Value>) -> Result<Claims, AuthError> {
    let string = |k: &str| -> Result<Option<String>, AuthError> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(malformed(&format!("{k} claim must be a string"))),
        }
    };
    let time = |k: &str| -> Result<Option<i64>, AuthError> {
        match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f.floor() as i64))
                .map(Some)
                .ok_or_else(|| malformed(&format!("{k} claim is out of range"))),
            Some(_) => Err(malformed(&format!("{k} claim must be a number"))),
        }
    };
    let aud = match m.get("aud") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("aud claim must be a string or an array of strings"))?,
        Some(_) => return Err(malformed("aud claim must be a string or an array of strings")),
    };
    Ok(Claims {
        iss: string("iss")?.unwrap_or_default(),
        aud,
        exp: time("exp")?,
        iat: time("iat")?,
        nbf: time("nbf")?,
        lxm: string("lxm")?,
        jti: string("jti")?,
    })
}

/// The claim rules of spec §6.4 at time `now` (unix seconds).
pub fn check_claims(claims: &Claims, audience: &str, method: &str, now: i64) -> Result<(), AuthError> {
    if !claims.aud.iter().any(|a| a == audience) {
        return Err(AuthError::InvalidAudience);
    }
    let exp = claims.exp.ok_or(AuthError::MissingExp)?;
    if now - LEEWAY_SECS >= exp {
        return Err(AuthError::Expired);
    }
    if claims.iat.is_some_and(|iat| now + LEEWAY_SECS < iat) {
        return Err(AuthError::UsedBeforeIssued);
    }
    if claims.nbf.is_some_and(|nbf| now + LEEWAY_SECS < nbf) {
        return Err(AuthError::NotValidYet);
    }
    if !is_valid_did(&claims.iss) {
        return Err(AuthError::InvalidIssuer(claims.iss.clone()));
    }
    match &claims.lxm {
        Some(lxm) if lxm != method => {
            Err(AuthError::WrongMethod { expected: method.to_string(), got: lxm.clone() })
        }
        _ => Ok(()),
    }
}

/// Verify `sig` (r||s) over `input` with SHA-256. High-S signatures are normalised first
/// (lenient, as indigo), and the key's curve must match the header's `alg`.
pub fn verify_signature(key: &PublicKey, alg: Alg, input: &[u8], sig: &[u8; 64]) -> Result<(), AuthError> {
    use k256::ecdsa::signature::Verifier;
    let bad = |why: &str| AuthError::BadSignature(why.to_string());
    match (key, alg) {
        (PublicKey::K256(k), Alg::Es256k) => {
            let s = k256::ecdsa::Signature::from_slice(sig).map_err(|_| bad("invalid r or s"))?;
            let s = s.normalize_s().unwrap_or(s);
            k.verify(input, &s).map_err(|_| bad("ecdsa verification error"))
        }
        (PublicKey::P256(k), Alg::Es256) => {
            let s = p256::ecdsa::Signature::from_slice(sig).map_err(|_| bad("invalid r or s"))?;
            let s = s.normalize_s().unwrap_or(s);
            k.verify(input, &s).map_err(|_| bad("ecdsa verification error"))
        }
        (key, alg) => Err(AuthError::BadSignature(format!(
            "token alg {} does not match the issuer's {} key",
            alg.as_str(),
            key.jwt_alg()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::atproto::keys::tests::{k256_key, p256_key};
    use serde_json::json;

    pub(crate) fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    /// Any signing key the tests use.
    pub(crate) enum TestKey {
        K(k256::ecdsa::SigningKey),
        P(p256::ecdsa::SigningKey),
    }

    impl TestKey {
        pub(crate) fn public(&self) -> PublicKey {
            match self {
                TestKey::K(k) => PublicKey::K256(*k.verifying_key()),
                TestKey::P(k) => PublicKey::P256(*k.verifying_key()),
            }
        }

        pub(crate) fn alg(&self) -> &'static str {
            self.public().jwt_alg()
        }

        /// Low-S r||s signature over `input`.
        pub(crate) fn sign(&self, input: &str) -> [u8; 64] {
            use k256::ecdsa::signature::Signer;
            let bytes = match self {
                TestKey::K(k) => {
                    let s: k256::ecdsa::Signature = k.sign(input.as_bytes());
                    s.to_bytes().to_vec()
                }
                TestKey::P(k) => {
                    let s: p256::ecdsa::Signature = k.sign(input.as_bytes());
                    s.normalize_s().unwrap_or(s).to_bytes().to_vec()
                }
            };
            bytes.try_into().expect("64-byte signature")
        }

        /// The same signature with s replaced by n - s (the high-S twin).
        pub(crate) fn sign_high_s(&self, input: &str) -> [u8; 64] {
            let low = self.sign(input);
            let flipped = match self {
                TestKey::K(_) => {
                    let s = k256::ecdsa::Signature::from_slice(&low).expect("sig");
                    let (r, s) = s.split_scalars();
                    k256::ecdsa::Signature::from_scalars(r, -*s).expect("high-s").to_bytes().to_vec()
                }
                TestKey::P(_) => {
                    let s = p256::ecdsa::Signature::from_slice(&low).expect("sig");
                    let (r, s) = s.split_scalars();
                    p256::ecdsa::Signature::from_scalars(r, -*s).expect("high-s").to_bytes().to_vec()
                }
            };
            flipped.try_into().expect("64 bytes")
        }
    }

    /// A compact token with this header and payload, signed by `key`.
    pub(crate) fn token(key: &TestKey, header: &Value, payload: &Value) -> String {
        let input = format!("{}.{}", b64(header), b64(payload));
        let sig = key.sign(&input);
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn claims_at(now: i64) -> Claims {
        Claims {
            iss: "did:plc:rjnvgfygwwqc5hyfsxmecosf".into(),
            aud: vec!["did:web:spindle.example.com".into()],
            exp: Some(now + 60),
            iat: Some(now),
            nbf: None,
            lxm: Some("sh.tangled.repo.addSecret".into()),
            jti: Some("0b8e3d6f27a94c1db5e0f4a9c2d17e63".into()),
        }
    }

    const AUD: &str = "did:web:spindle.example.com";
    const M: &str = "sh.tangled.repo.addSecret";

    #[test]
    fn fixture_claims_decode() {
        let path =
            format!("{}/../shared/spec/fixtures/xrpc/service-auth.decoded.json", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("fixture file");
        let fixture: Value = serde_json::from_str(&text).expect("fixture json");
        let key = TestKey::K(k256_key("fixture"));
        let t = token(&key, &fixture["header"], &fixture["payload"]);
        let d = decode(&t).expect("decodes");
        assert_eq!(d.alg, Alg::Es256k);
        assert_eq!(d.claims, claims_at(1764668600));
        check_claims(&d.claims, AUD, M, 1764668600 + 30).expect("valid at issue time + 30 s");
        verify_signature(&key.public(), d.alg, d.signing_input.as_bytes(), &d.signature).expect("sig");
    }

    #[test]
    fn time_checks_have_five_seconds_leeway() {
        let now = 1_000_000;
        let mut c = claims_at(now);
        c.exp = Some(now - 4);
        check_claims(&c, AUD, M, now).expect("within leeway");
        c.exp = Some(now - 5);
        assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::Expired));
        c.exp = None;
        assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::MissingExp));
        let mut c = claims_at(now);
        c.iat = Some(now + 5);
        check_claims(&c, AUD, M, now).expect("iat within leeway");
        c.iat = Some(now + 6);
        assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::UsedBeforeIssued));
        let mut c = claims_at(now);
        c.nbf = Some(now + 5);
        check_claims(&c, AUD, M, now).expect("nbf within leeway");
        c.nbf = Some(now + 6);
        assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::NotValidYet));
    }

    #[test]
    fn audience_issuer_and_method() {
        let now = 1_000_000;
        let mut c = claims_at(now);
        c.aud = vec!["did:web:other".into(), AUD.into()];
        check_claims(&c, AUD, M, now).expect("array aud containing ours");
        for aud in [vec![], vec!["did:web:spindle.example.com:443".to_string()], vec![AUD.to_uppercase()]] {
            c.aud = aud;
            assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::InvalidAudience));
        }
        let mut c = claims_at(now);
        c.iss = "alice.bsky.social".into();
        assert_eq!(check_claims(&c, AUD, M, now), Err(AuthError::InvalidIssuer("alice.bsky.social".into())));
        let mut c = claims_at(now);
        c.lxm = None;
        check_claims(&c, AUD, M, now).expect("absent lxm is accepted");
        c.lxm = Some("sh.tangled.repo.listSecrets".into());
        let err = check_claims(&c, AUD, M, now).expect_err("wrong lxm");
        assert_eq!(err.label(), "wrong_method");
    }

    #[test]
    fn decode_rejects_malformed_tokens() {
        let key = TestKey::P(p256_key("m"));
        let good =
            token(&key, &json!({"alg": "ES256", "typ": "JWT"}), &json!({"iss": "did:plc:x", "exp": 1}));
        let (input, sig) = good.rsplit_once('.').expect("three parts");
        let cases: Vec<(String, &str)> = vec![
            (input.to_string(), "malformed"),
            (format!("{good}.x"), "malformed"),
            (format!("!!!.{}", &good[good.find('.').expect("dot") + 1..]), "malformed"),
            (
                format!("{}.{}.{sig}", b64(&json!({"alg": "ES256"})), URL_SAFE_NO_PAD.encode("{not json")),
                "malformed",
            ),
            (format!("{}.{}.{sig}", b64(&json!({"alg": "ES256"})), b64(&json!([1, 2]))), "malformed"),
            (
                format!("{}.{}.{sig}", b64(&json!({"alg": "ES256"})), b64(&json!({"exp": "soon"}))),
                "malformed",
            ),
            (format!("{}.{}.{sig}", b64(&json!({"alg": "ES256"})), b64(&json!({"aud": [1]}))), "malformed"),
            (format!("{input}.{sig}="), "malformed"),
            (format!("{input}.{}", URL_SAFE_NO_PAD.encode([0u8; 63])), "bad_signature"),
        ];
        for (t, label) in cases {
            assert_eq!(decode(&t).expect_err("must fail").label(), label, "{t}");
        }
        for alg in [json!("none"), json!("HS256"), json!("RS256"), json!("es256k"), json!(null), json!(7)] {
            let t = token(&key, &json!({"alg": alg}), &json!({"exp": 1}));
            assert_eq!(decode(&t).expect_err("alg").label(), "unsupported_alg", "{alg}");
        }
        let t = token(&key, &json!({"typ": "JWT"}), &json!({"exp": 1}));
        assert_eq!(decode(&t).expect_err("no alg").label(), "unsupported_alg");
    }

    #[test]
    fn signatures_verify_leniently_and_strictly_by_curve() {
        for key in [TestKey::K(k256_key("s")), TestKey::P(p256_key("s"))] {
            let alg = if matches!(key, TestKey::K(_)) { Alg::Es256k } else { Alg::Es256 };
            let input = "header.payload";
            verify_signature(&key.public(), alg, input.as_bytes(), &key.sign(input)).expect("low-S");
            verify_signature(&key.public(), alg, input.as_bytes(), &key.sign_high_s(input)).expect("high-S");
            let err = verify_signature(&key.public(), alg, b"header.other", &key.sign(input))
                .expect_err("wrong input");
            assert_eq!(err.label(), "bad_signature");
            let err =
                verify_signature(&key.public(), alg, input.as_bytes(), &[0u8; 64]).expect_err("zero sig");
            assert_eq!(err.label(), "bad_signature");
            let other = if alg == Alg::Es256k { Alg::Es256 } else { Alg::Es256k };
            let err = verify_signature(&key.public(), other, input.as_bytes(), &key.sign(input))
                .expect_err("alg mismatch");
            assert!(err.to_string().contains("does not match"), "{err}");
        }
    }

    #[test]
    fn header_token_extraction() {
        assert_eq!(token_from_header(Some("Bearer abc")), Ok("abc"));
        assert_eq!(token_from_header(Some("abc")), Ok("abc"));
        assert_eq!(token_from_header(None), Err(AuthError::MissingToken));
        assert_eq!(token_from_header(Some("Bearer ")), Err(AuthError::MissingToken));
        assert_eq!(token_from_header(Some("")), Err(AuthError::MissingToken));
    }
}
