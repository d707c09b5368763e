//! AT Protocol service auth for the secrets XRPC methods (spec §6.4): the caller's PDS signs a
//! short-lived JWT with the user's `#atproto` key; we check claims, resolve the issuer's DID
//! and verify the signature, refetching the DID document once on failure (key rotation).

pub mod jwt;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::atproto::cache::TtlCache;
use crate::atproto::{IdentityError, Resolver};

/// Why a token was refused. Display is the verifier text; the HTTP layer answers
/// `403 {"error":"Auth","message":"signature verification failed: <Display>"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is missing: no Authorization header")]
    MissingToken,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token is unverifiable: signing method {0} is invalid (only ES256K and ES256)")]
    UnsupportedAlg(String),
    #[error("token has invalid claims: token has invalid audience")]
    InvalidAudience,
    #[error("token has invalid claims: token is missing required claim: exp claim is required")]
    MissingExp,
    #[error("token has invalid claims: token is expired")]
    Expired,
    #[error("token has invalid claims: token used before issued")]
    UsedBeforeIssued,
    #[error("token has invalid claims: token is not valid yet")]
    NotValidYet,
    #[error("token has invalid claims: token has invalid issuer {0:?}")]
    InvalidIssuer(String),
    #[error("token has invalid claims: lxm {got:?} does not match method {expected}")]
    WrongMethod { expected: String, got: String },
    #[error("token has invalid claims: token id (jti) has already been used")]
    Replayed,
    #[error("token is unverifiable: failed to resolve issuer: {0}")]
    Identity(IdentityError),
    #[error("token is unverifiable: issuer {0} has no usable #atproto signing key")]
    NoSigningKey(String),
    #[error("token signature is invalid: {0}")]
    BadSignature(String),
}

impl AuthError {
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnsupportedAlg(_) => "unsupported_alg",
            AuthError::InvalidAudience => "invalid_audience",
            AuthError::MissingExp => "missing_exp",
            AuthError::Expired => "expired",
            AuthError::UsedBeforeIssued => "used_before_issued",
            AuthError::NotValidYet => "not_valid_yet",
            AuthError::InvalidIssuer(_) => "invalid_issuer",
            AuthError::WrongMethod { .. } => "wrong_method",
            AuthError::Replayed => "replayed",
            AuthError::Identity(_) => "identity",
            AuthError::NoSigningKey(_) => "no_signing_key",
            AuthError::BadSignature(_) => "bad_signature",
        }
    }
}

/// The service DID a spindle answers to: `did:web:<SPINDLE_SERVER_HOSTNAME>`, verbatim (a
/// `:port` is not percent-encoded, matching what the appview asks the PDS for).
pub fn service_did(hostname: &str) -> String {
    format!("did:web:{hostname}")
}

/// Labels of one verification: `ok` or an [`AuthError::label`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyLabels {
    pub outcome: &'static str,
}

/// Service-auth counters; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct AuthMetrics {
    pub verifications: Family<VerifyLabels, Counter>,
}

impl AuthMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bobbin_service_auth_verifications",
            "Service-auth token verifications, by outcome",
            self.verifications.clone(),
        );
    }
}

/// How many token ids are remembered for replay detection. Tokens live about a minute, so
/// this bounds memory while covering far more than any real request rate.
const JTI_CAPACITY: usize = 100_000;

/// At most one key-rotation refetch per issuer in this window.
const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
const REFETCH_CAPACITY: usize = 10_000;

/// Verifies service-auth tokens addressed to this spindle. Clones share the replay cache.
#[derive(Clone)]
pub struct ServiceAuth {
    inner: Arc<Inner>,
}

struct Inner {
    audience: String,
    resolver: Resolver,
    seen_jti: Mutex<TtlCache<(String, String), ()>>,
    /// Issuers refetched after a signature failure recently: forged tokens naming a real DID
    /// must not turn into one PLC request each.
    refetched: Mutex<TtlCache<String, ()>>,
    metrics: AuthMetrics,
}

impl std::fmt::Debug for ServiceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAuth").field("audience", &self.inner.audience).finish_non_exhaustive()
    }
}

impl ServiceAuth {
    /// `service_did` is `did:web:<SPINDLE_SERVER_HOSTNAME>`, the required `aud`.
    pub fn new(service_did: impl Into<String>, resolver: Resolver) -> Self {
        ServiceAuth {
            inner: Arc::new(Inner {
                audience: service_did.into(),
                resolver,
                seen_jti: Mutex::new(TtlCache::new(JTI_CAPACITY)),
                refetched: Mutex::new(TtlCache::new(REFETCH_CAPACITY)),
                metrics: AuthMetrics::default(),
            }),
        }
    }

    /// Counters to register with the server's registry.
    pub fn metrics(&self) -> &AuthMetrics {
        &self.inner.metrics
    }

    pub fn audience(&self) -> &str {
        &self.inner.audience
    }

    /// Verify the `Authorization` header for XRPC method `lxm`; the actor DID (`iss`) on success.
    pub async fn verify(&self, authorization: Option<&str>, lxm: &str) -> Result<String, AuthError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        self.verify_at(authorization, lxm, now).await
    }

    /// [`ServiceAuth::verify`] at a given unix time.
    pub async fn verify_at(
        &self,
        authorization: Option<&str>,
        lxm: &str,
        now: i64,
    ) -> Result<String, AuthError> {
        let result = self.check(authorization, lxm, now).await;
        let outcome = result.as_ref().map_or_else(AuthError::label, |_| "ok");
        self.inner.metrics.verifications.get_or_create(&VerifyLabels { outcome }).inc();
        if let Err(e) = &result {
            tracing::debug!(error = %e, lxm, "service auth refused");
        }
        result
    }

    async fn check(&self, authorization: Option<&str>, lxm: &str, now: i64) -> Result<String, AuthError> {
        let token = jwt::token_from_header(authorization)?;
        let t = jwt::decode(token)?;
        jwt::check_claims(&t.claims, &self.inner.audience, lxm, now)?;
        let iss = t.claims.iss.as_str();
        let input = t.signing_input.as_bytes();

        let resolver = &self.inner.resolver;
        let (identity, cached) = resolver.resolve_tracked(iss).await;
        let identity = identity.map_err(AuthError::Identity)?;
        let first = match &identity.signing_key {
            Some(key) => jwt::verify_signature(key, t.alg, input, &t.signature),
            None => Err(AuthError::NoSigningKey(iss.to_string())),
        };
        match first {
            Ok(()) => {}
            // The cached document may predate a key rotation: refetch once.
            Err(AuthError::BadSignature(_) | AuthError::NoSigningKey(_))
                if cached && self.may_refetch(iss) =>
            {
                tracing::debug!(did = iss, "signature check failed with a cached key; refetching");
                resolver.purge(iss).await;
                let identity = resolver.resolve(iss).await.map_err(AuthError::Identity)?;
                let key = identity.signing_key.ok_or_else(|| AuthError::NoSigningKey(iss.to_string()))?;
                jwt::verify_signature(&key, t.alg, input, &t.signature)?;
            }
            Err(e) => return Err(e),
        }

        if let (Some(jti), Some(exp)) = (&t.claims.jti, t.claims.exp) {
            self.check_replay(iss, jti, exp, now)?;
        }
        Ok(iss.to_string())
    }

    /// True at most once per [`REFETCH_INTERVAL`] for each issuer.
    fn may_refetch(&self, iss: &str) -> bool {
        let now = Instant::now();
        let mut recent = self.inner.refetched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.get(&iss.to_string(), now).is_some() {
            return false;
        }
        recent.insert(iss.to_string(), (), now, now + REFETCH_INTERVAL);
        true
    }

    /// Remember (iss, jti) until the token expires; a second use within that time is refused.
    fn check_replay(&self, iss: &str, jti: &str, exp: i64, now: i64) -> Result<(), AuthError> {
        let key = (iss.to_string(), jti.to_string());
        let at = Instant::now();
        let mut seen = self.inner.seen_jti.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.get(&key, at).is_some() {
            return Err(AuthError::Replayed);
        }
        let remaining = (exp + jwt::LEEWAY_SECS - now).clamp(1, 24 * 3600) as u64;
        seen.insert(key, (), at, at + Duration::from_secs(remaining));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::jwt::tests::{TestKey, b64, token};
    use super::*;
    use crate::atproto::identity::tests::{ALICE, did_doc, resolver};
    use crate::atproto::keys::tests::{k256_key, p256_key};
    use crate::atproto::testserver::TestServer;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::{Value, json};

    const AUD: &str = "did:web:spindle.example.com";
    const ADD: &str = "sh.tangled.repo.addSecret";

    fn now() -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs() as i64
    }

    fn payload(iss: &str) -> Value {
        let n = now();
        json!({"iat": n, "iss": iss, "aud": AUD, "exp": n + 60, "lxm": ADD, "jti": format!("{n}-{}", rand_suffix())})
    }

    fn rand_suffix() -> u64 {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).expect("random");
        u64::from_le_bytes(b)
    }

    fn header(key: &TestKey) -> Value {
        json!({"typ": "JWT", "alg": key.alg()})
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    /// A PLC server that knows ALICE with `key`, and a verifier for it.
    async fn setup(key: &TestKey) -> (TestServer, ServiceAuth) {
        let srv = TestServer::start().await;
        srv.set_json(
            &format!("/plc/{ALICE}"),
            &did_doc(ALICE, &key.public(), "https://pds.example.com", "alice.test"),
        );
        let auth = ServiceAuth::new(AUD, resolver(&srv));
        (srv, auth)
    }

    #[tokio::test]
    async fn valid_es256k_and_es256_tokens_are_accepted() {
        for key in [TestKey::K(k256_key("alice")), TestKey::P(p256_key("alice"))] {
            let (srv, auth) = setup(&key).await;
            let t = token(&key, &header(&key), &payload(ALICE));
            assert_eq!(auth.verify(Some(&bearer(&t)), ADD).await, Ok(ALICE.to_string()), "{}", key.alg());
            // Without "Bearer " the whole header value is the token.
            let t = token(&key, &header(&key), &payload(ALICE));
            assert_eq!(auth.verify(Some(&t), ADD).await, Ok(ALICE.to_string()));
            assert_eq!(srv.count(&format!("/plc/{ALICE}")), 1, "second verification hits the cache");
        }
    }

    #[test]
    fn service_did_is_the_bare_hostname() {
        assert_eq!(service_did("spindle.example.com"), AUD);
        assert_eq!(service_did("localhost:6555"), "did:web:localhost:6555");
    }

    #[tokio::test]
    async fn high_s_signature_is_accepted() {
        let key = TestKey::K(k256_key("alice"));
        let (_srv, auth) = setup(&key).await;
        let input = format!("{}.{}", b64(&header(&key)), b64(&payload(ALICE)));
        let t = format!("{input}.{}", URL_SAFE_NO_PAD.encode(key.sign_high_s(&input)));
        assert_eq!(auth.verify(Some(&bearer(&t)), ADD).await, Ok(ALICE.to_string()));
    }

    #[tokio::test]
    async fn claim_failures_are_specific() {
        let key = TestKey::K(k256_key("alice"));
        let (_srv, auth) = setup(&key).await;
        let n = now();
        let cases: Vec<(Value, &str)> = vec![
            (json!({"iss": ALICE, "aud": AUD, "exp": n - 10, "lxm": ADD}), "expired"),
            (json!({"iss": ALICE, "aud": AUD, "lxm": ADD}), "missing_exp"),
            (json!({"iss": ALICE, "aud": "did:web:other.example.com", "exp": n + 60}), "invalid_audience"),
            (
                json!({"iss": ALICE, "aud": AUD, "exp": n + 60, "lxm": "sh.tangled.repo.removeSecret"}),
                "wrong_method",
            ),
            (json!({"iss": ALICE, "aud": AUD, "exp": n + 60, "iat": n + 60}), "used_before_issued"),
            (json!({"iss": ALICE, "aud": AUD, "exp": n + 120, "nbf": n + 60}), "not_valid_yet"),
            (json!({"iss": "alice.test", "aud": AUD, "exp": n + 60}), "invalid_issuer"),
        ];
        for (p, label) in cases {
            let t = token(&key, &header(&key), &p);
            let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("must fail");
            assert_eq!(err.label(), label, "{p}: {err}");
        }
        let t = token(&key, &header(&key), &json!({"iss": ALICE, "aud": AUD, "exp": n - 10}));
        let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("expired");
        assert_eq!(err.to_string(), "token has invalid claims: token is expired");
        // Missing lxm is accepted (Go does not check it at all).
        let t = token(&key, &header(&key), &json!({"iss": ALICE, "aud": [AUD], "exp": n + 60}));
        assert_eq!(auth.verify(Some(&bearer(&t)), ADD).await, Ok(ALICE.to_string()));
    }

    #[tokio::test]
    async fn malformed_tokens_and_headers() {
        let key = TestKey::P(p256_key("alice"));
        let (_srv, auth) = setup(&key).await;
        assert_eq!(auth.verify(None, ADD).await, Err(AuthError::MissingToken));
        let good = token(&key, &header(&key), &payload(ALICE));
        let (input, _) = good.rsplit_once('.').expect("parts");
        let cases = [
            (input.to_string(), "malformed"),
            (format!("*{good}"), "malformed"),
            (format!("{}.{}.AAAA", b64(&header(&key)), URL_SAFE_NO_PAD.encode("nope")), "malformed"),
            (token(&key, &json!({"alg": "none"}), &payload(ALICE)), "unsupported_alg"),
            (token(&key, &json!({"alg": "HS256"}), &payload(ALICE)), "unsupported_alg"),
        ];
        for (t, label) in cases {
            let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("must fail");
            assert_eq!(err.label(), label, "{t}: {err}");
        }
    }

    #[tokio::test]
    async fn bad_signature_and_unknown_issuer() {
        let key = TestKey::K(k256_key("alice"));
        let (srv, auth) = setup(&key).await;
        let mallory = TestKey::K(k256_key("mallory"));
        let t = token(&mallory, &header(&mallory), &payload(ALICE));
        let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("wrong key");
        assert_eq!(err.label(), "bad_signature");
        assert!(err.to_string().starts_with("token signature is invalid"), "{err}");
        // A fresh (uncached) key that fails is not refetched; a cached one is refetched once.
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 1);
        let t = token(&mallory, &header(&mallory), &payload(ALICE));
        auth.verify(Some(&bearer(&t)), ADD).await.expect_err("still wrong");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "purge and retry once");
        for _ in 0..3 {
            let t = token(&mallory, &header(&mallory), &payload(ALICE));
            auth.verify(Some(&bearer(&t)), ADD).await.expect_err("forged");
        }
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "at most one refetch per 30 s");

        // A P-256 token for a K-256 identity.
        let p = TestKey::P(p256_key("alice"));
        let t = token(&p, &header(&p), &payload(ALICE));
        assert_eq!(auth.verify(Some(&bearer(&t)), ADD).await.expect_err("curve").label(), "bad_signature");

        let unknown = "did:plc:unknownnnnnnnnnnnnnnnnnn";
        let t = token(&key, &header(&key), &payload(unknown));
        let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("404");
        assert_eq!(err, AuthError::Identity(IdentityError::NotFound(unknown.into())));
    }

    #[tokio::test]
    async fn key_rotation_succeeds_through_purge_and_retry() {
        let old = TestKey::K(k256_key("old"));
        let (srv, auth) = setup(&old).await;
        let t = token(&old, &header(&old), &payload(ALICE));
        auth.verify(Some(&bearer(&t)), ADD).await.expect("old key, now cached");

        let new = TestKey::P(p256_key("new"));
        srv.set_json(
            &format!("/plc/{ALICE}"),
            &did_doc(ALICE, &new.public(), "https://pds.example.com", "alice.test"),
        );
        let t = token(&new, &header(&new), &payload(ALICE));
        assert_eq!(auth.verify(Some(&bearer(&t)), ADD).await, Ok(ALICE.to_string()));
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "one refetch after the cached key failed");
        let t = token(&new, &header(&new), &payload(ALICE));
        auth.verify(Some(&bearer(&t)), ADD).await.expect("new key cached");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2);
    }

    #[tokio::test]
    async fn replayed_jti_is_refused() {
        let key = TestKey::K(k256_key("alice"));
        let (_srv, auth) = setup(&key).await;
        let t = token(&key, &header(&key), &payload(ALICE));
        auth.verify(Some(&bearer(&t)), ADD).await.expect("first use");
        let err = auth.clone().verify(Some(&bearer(&t)), ADD).await.expect_err("replay");
        assert_eq!(err, AuthError::Replayed);

        let mut registry = Registry::default();
        auth.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains(r#"bobbin_service_auth_verifications_total{outcome="ok"} 1"#), "{text}");
        assert!(text.contains(r#"bobbin_service_auth_verifications_total{outcome="replayed"} 1"#), "{text}");
        // Tokens without jti cannot be tracked and are accepted repeatedly.
        let n = now();
        let t = token(&key, &header(&key), &json!({"iss": ALICE, "aud": AUD, "exp": n + 60}));
        auth.verify(Some(&bearer(&t)), ADD).await.expect("first");
        auth.verify(Some(&bearer(&t)), ADD).await.expect("no jti, no replay check");
    }

    #[tokio::test]
    async fn issuer_without_key_is_refused() {
        let srv = TestServer::start().await;
        srv.set_json(&format!("/plc/{ALICE}"), &json!({"id": ALICE}));
        let auth = ServiceAuth::new(AUD, resolver(&srv));
        let key = TestKey::K(k256_key("alice"));
        let t = token(&key, &header(&key), &payload(ALICE));
        let err = auth.verify(Some(&bearer(&t)), ADD).await.expect_err("no key");
        assert_eq!(err.label(), "no_signing_key");
    }
}
