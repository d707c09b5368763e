//! DID resolution (did:plc through the PLC directory, did:web through `/.well-known/did.json`)
//! with a bounded cache: hits live 24 h, errors 2 min (as the Go spindle's indigo directory),
//! so a burst of requests from one user costs one lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::cache::TtlCache;
use super::did::{Did, DidDocument, DidError, is_valid_handle, parse_did};
use super::http::{HttpClient, HttpError};
use super::keys::PublicKey;

/// What atproto needs from a DID document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub did: String,
    /// The claimed handle (`alsoKnownAs`), not verified in the other direction (bug B16).
    pub handle: Option<String>,
    /// The `#atproto_pds` service endpoint, without a trailing `/`.
    pub pds: Option<String>,
    /// The `#atproto` verification method; `None` if absent or undecodable.
    pub signing_key: Option<PublicKey>,
}

/// Why an identity could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    InvalidDid(#[from] DidError),
    #[error("DID not found: {0}")]
    NotFound(String),
    #[error("resolving {did}: {source}")]
    Http { did: String, source: HttpError },
    #[error("resolving {did}: unexpected HTTP status {status}")]
    BadStatus { did: String, status: u16 },
    #[error("invalid DID document for {did}: {reason}")]
    InvalidDocument { did: String, reason: String },
    #[error("invalid handle {0:?}")]
    InvalidHandle(String),
    #[error("failed to resolve handle {handle}: {reason}")]
    HandleResolution { handle: String, reason: String },
    #[error("failed to resolve handle {handle}: {did} does not claim it (bidirectional check)")]
    HandleMismatch { handle: String, did: String },
}

impl IdentityError {
    pub fn label(&self) -> &'static str {
        match self {
            IdentityError::InvalidDid(_) => "invalid_did",
            IdentityError::NotFound(_) => "not_found",
            IdentityError::Http { .. } => "http",
            IdentityError::BadStatus { .. } => "bad_status",
            IdentityError::InvalidDocument { .. } => "invalid_document",
            IdentityError::InvalidHandle(_) => "invalid_handle",
            IdentityError::HandleResolution { .. } => "handle_resolution",
            IdentityError::HandleMismatch { .. } => "handle_mismatch",
        }
    }
}

/// Cache bounds and lifetimes.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub capacity: usize,
    pub hit_ttl: Duration,
    pub error_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            capacity: 250_000,
            hit_ttl: Duration::from_secs(24 * 3600),
            error_ttl: Duration::from_secs(120),
        }
    }
}

type Cached = Result<Identity, IdentityError>;

/// Labels of one identity lookup: where the answer came from and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `cache` or `network`.
    pub source: &'static str,
    /// `ok` or an [`IdentityError::label`].
    pub outcome: &'static str,
}

/// Identity lookup counters; clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    pub lookups: Family<LookupLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bobbin_identity_lookups",
            "DID resolutions, by source (cache or network) and outcome",
            self.lookups.clone(),
        );
    }

    fn record(&self, source: &'static str, result: &Cached) {
        let outcome = result.as_ref().map_or_else(IdentityError::label, |_| "ok");
        self.lookups.get_or_create(&LookupLabels { source, outcome }).inc();
    }
}

/// Resolves DIDs to identities; clones share the cache and the HTTP pool.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    plc_url: String,
    http: HttpClient,
    settings: CacheSettings,
    cache: Mutex<TtlCache<String, Cached>>,
    metrics: IdentityMetrics,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    handles: Mutex<TtlCache<String, Result<String, IdentityError>>>,
}

/// Removes a DID's fetch gate once its last user is done, also when the lookup is cancelled.
struct InflightGate<'a> {
    resolver: &'a Resolver,
    did: &'a str,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for InflightGate<'_> {
    fn drop(&mut self) {
        let mut map = self.resolver.inflight();
        // Clones are only taken under the map lock, so the count is exact: map + us = 2.
        if map.get(self.did).is_some_and(|g| Arc::ptr_eq(g, &self.gate)) && Arc::strong_count(&self.gate) == 2
        {
            map.remove(self.did);
        }
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("plc_url", &self.inner.plc_url).finish_non_exhaustive()
    }
}

impl Resolver {
    /// `plc_url` is `SPINDLE_SERVER_PLC_URL` (e.g. `https://plc.directory`).
    pub fn new(plc_url: impl Into<String>, http: HttpClient) -> Self {
        Resolver::with_cache(plc_url, http, CacheSettings::default())
    }

    pub fn with_cache(plc_url: impl Into<String>, http: HttpClient, settings: CacheSettings) -> Self {
        let plc_url = plc_url.into().trim_end_matches('/').to_string();
        let cache = Mutex::new(TtlCache::new(settings.capacity));
        let metrics = IdentityMetrics::default();
        let inflight = Mutex::new(HashMap::new());
        let handles = Mutex::new(TtlCache::new(settings.capacity));
        Resolver { inner: Arc::new(Inner { plc_url, http, settings, cache, metrics, inflight, handles }) }
    }

    /// Counters to register with the server's registry.
    pub fn metrics(&self) -> &IdentityMetrics {
        &self.inner.metrics
    }

    pub fn http(&self) -> &HttpClient {
        &self.inner.http
    }

    /// Resolve a DID, from the cache when possible.
    pub async fn resolve(&self, did: &str) -> Result<Identity, IdentityError> {
        self.resolve_tracked(did).await.0
    }

    /// Like [`Resolver::resolve`], also saying whether the answer came from the cache (a
    /// signature failure is only worth a refetch if it did).
    pub async fn resolve_tracked(&self, did: &str) -> (Result<Identity, IdentityError>, bool) {
        let parsed = match parse_did(did) {
            Ok(p) => p,
            Err(e) => return (Err(e.into()), false),
        };
        if let Some(hit) = self.cached(did) {
            return (hit, true);
        }
        // One fetch per DID at a time: concurrent callers wait and then read the cache.
        let gate = self.inflight().entry(did.to_string()).or_default().clone();
        let gate = InflightGate { resolver: self, did, gate };
        let _turn = gate.gate.lock().await;
        if let Some(hit) = self.cached(did) {
            return (hit, true);
        }
        let result = self.fetch(&parsed).await;
        self.inner.metrics.record("network", &result);
        let now = Instant::now();
        let ttl = if result.is_ok() { self.inner.settings.hit_ttl } else { self.inner.settings.error_ttl };
        self.lock().insert(did.to_string(), result.clone(), now, now + ttl);
        if let Err(e) = &result {
            tracing::debug!(did, error = %e, "identity resolution failed");
        }
        (result, false)
    }

    fn cached(&self, did: &str) -> Option<Cached> {
        let (hit, _) = self.lock().get(&did.to_string(), Instant::now())?;
        self.inner.metrics.record("cache", &hit);
        Some(hit)
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.inner.inflight.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forget a DID so the next lookup refetches it (key rotation).
    pub async fn purge(&self, did: &str) {
        self.lock().remove(&did.to_string());
    }

    /// A DID, or a handle verified in both directions (handle → DID → document claims handle).
    pub async fn resolve_authority(&self, authority: &str) -> Result<Identity, IdentityError> {
        if authority.starts_with("did:") {
            return self.resolve(authority).await;
        }
        let handle = authority.to_ascii_lowercase();
        let did = self.resolve_handle(&handle).await?;
        let identity = self.resolve(&did).await?;
        if identity.handle.as_deref() != Some(handle.as_str()) {
            return Err(IdentityError::HandleMismatch { handle, did });
        }
        Ok(identity)
    }

    /// Handle → DID through `https://<handle>/.well-known/atproto-did`. The DNS TXT method is
    /// not supported (no DNS client in the dependency graph); such handles fail with a clear error.
    /// Answers are cached like DID lookups.
    pub async fn resolve_handle(&self, handle: &str) -> Result<String, IdentityError> {
        if !is_valid_handle(handle) {
            return Err(IdentityError::InvalidHandle(handle.to_string()));
        }
        let handles = || self.inner.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((hit, _)) = handles().get(&handle.to_string(), Instant::now()) {
            return hit;
        }
        let result = self.fetch_handle(handle).await;
        let now = Instant::now();
        let ttl = if result.is_ok() { self.inner.settings.hit_ttl } else { self.inner.settings.error_ttl };
        handles().insert(handle.to_string(), result.clone(), now, now + ttl);
        result
    }

    async fn fetch_handle(&self, handle: &str) -> Result<String, IdentityError> {
        let fail = |reason: String| IdentityError::HandleResolution { handle: handle.to_string(), reason };
        let resp = self.web_get(handle, "/.well-known/atproto-did").await.map_err(|e| fail(e.to_string()))?;
        if !resp.status.is_success() {
            return Err(fail(format!(
                "https well-known lookup returned HTTP {} (DNS TXT lookup is not supported)",
                resp.status.as_u16()
            )));
        }
        let text = std::str::from_utf8(&resp.body).map_err(|_| fail("response is not UTF-8".into()))?;
        let did = text.trim();
        parse_did(did).map_err(|e| fail(e.to_string()))?;
        Ok(did.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TtlCache<String, Cached>> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that
        // matters (worst case a stale entry), so recover from poisoning.
        self.inner.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn fetch(&self, parsed: &Did<'_>) -> Result<Identity, IdentityError> {
        let (did, resp) = match parsed {
            Did::Plc(did) => {
                let url = format!("{}/{did}", self.inner.plc_url);
                (*did, self.inner.http.get(&url, None).await)
            }
            Did::Web { did, host } => (*did, self.web_get(host, "/.well-known/did.json").await),
        };
        let resp = resp.map_err(|source| IdentityError::Http { did: did.to_string(), source })?;
        match resp.status.as_u16() {
            200..=299 => {}
            404 | 410 => return Err(IdentityError::NotFound(did.to_string())),
            status => return Err(IdentityError::BadStatus { did: did.to_string(), status }),
        }
        let invalid = |reason: String| IdentityError::InvalidDocument { did: did.to_string(), reason };
        let doc: DidDocument = serde_json::from_slice(&resp.body).map_err(|e| invalid(e.to_string()))?;
        if doc.id != did {
            return Err(invalid(format!("document id is {:?}", doc.id)));
        }
        let signing_key = match doc.signing_key() {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                tracing::warn!(did, error = %e, "ignoring undecodable #atproto key");
                None
            }
            None => None,
        };
        Ok(Identity { did: did.to_string(), handle: doc.handle(), pds: doc.pds_endpoint(), signing_key })
    }

    /// GET `https://<host><path>`, or through the configured dev/test origin.
    async fn web_get(&self, host: &str, path: &str) -> Result<super::http::HttpResponse, HttpError> {
        let http = &self.inner.http;
        match &http.settings().web_origin_override {
            Some(origin) => {
                let url = format!("{}{path}", origin.trim_end_matches('/'));
                http.get(&url, Some(host)).await
            }
            None => http.get(&format!("https://{host}{path}"), None).await,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::atproto::http::HttpSettings;
    use crate::atproto::keys::tests::{k256_key, p256_key};
    use crate::atproto::testserver::TestServer;

    pub(crate) const ALICE: &str = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";
    pub(crate) const BOB: &str = "did:plc:bobbbbbbbbbbbbbbbbbbbbbb";

    /// A DID document with an `#atproto` key, a PDS and a handle.
    pub(crate) fn did_doc(did: &str, key: &PublicKey, pds: &str, handle: &str) -> serde_json::Value {
        serde_json::json!({
            "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
            "id": did,
            "alsoKnownAs": [format!("at://{handle}")],
            "verificationMethod": [{
                "id": format!("{did}#atproto"),
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": key.to_multibase(),
            }],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
        })
    }

    pub(crate) fn test_http(srv: &TestServer) -> HttpClient {
        HttpClient::new(HttpSettings {
            web_origin_override: Some(srv.origin()),
            request_timeout: Duration::from_secs(5),
            ..HttpSettings::default()
        })
        .expect("http client")
    }

    pub(crate) fn resolver(srv: &TestServer) -> Resolver {
        Resolver::new(srv.url("/plc/"), test_http(srv))
    }

    #[tokio::test]
    async fn did_plc_resolves_and_is_cached() {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("alice").verifying_key());
        srv.set_json(
            &format!("/plc/{ALICE}"),
            &did_doc(ALICE, &key, "https://pds.example.com/", "alice.test"),
        );
        let r = resolver(&srv);
        let id = r.resolve(ALICE).await.expect("resolves");
        assert_eq!(
            id,
            Identity {
                did: ALICE.into(),
                handle: Some("alice.test".into()),
                pds: Some("https://pds.example.com".into()),
                signing_key: Some(key),
            }
        );
        let (again, cached) = r.clone().resolve_tracked(ALICE).await;
        assert_eq!(again.expect("cached"), id);
        assert!(cached);
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 1, "second lookup is a cache hit");
        r.purge(ALICE).await;
        r.resolve(ALICE).await.expect("refetched");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "purge forces a refetch");

        let mut registry = Registry::default();
        r.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains(r#"bobbin_identity_lookups_total{source="network",outcome="ok"} 2"#), "{text}");
        assert!(text.contains(r#"bobbin_identity_lookups_total{source="cache",outcome="ok"} 1"#), "{text}");
    }

    #[tokio::test]
    async fn concurrent_lookups_share_one_fetch() {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("alice").verifying_key());
        srv.set_json(&format!("/plc/{ALICE}"), &did_doc(ALICE, &key, "https://x", "alice.test"));
        srv.set_delay(Duration::from_millis(200));
        let r = resolver(&srv);
        let lookups = (0..8).map(|_| {
            let r = r.clone();
            tokio::spawn(async move { r.resolve(ALICE).await })
        });
        for res in futures::future::join_all(lookups).await {
            res.expect("task").expect("resolves");
        }
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 1, "one fetch for eight callers");
        assert!(r.inflight().is_empty(), "gates are cleaned up");

        // A cancelled lookup leaves no gate behind either.
        r.purge(ALICE).await;
        let slow = r.clone();
        let _ =
            tokio::time::timeout(Duration::from_millis(50), async move { slow.resolve(ALICE).await }).await;
        assert!(r.inflight().is_empty(), "cancelled lookup cleaned up");
    }

    #[tokio::test]
    async fn did_web_resolves_through_well_known() {
        let srv = TestServer::start().await;
        let key = PublicKey::P256(*p256_key("web").verifying_key());
        let did = "did:web:alice.example.com";
        srv.set_json(
            "/.well-known/did.json",
            &did_doc(did, &key, "https://pds.example.com", "alice.example.com"),
        );
        let id = resolver(&srv).resolve(did).await.expect("did:web resolves");
        assert_eq!(id.signing_key, Some(key));
        assert_eq!(srv.requests(), vec!["alice.example.com /.well-known/did.json".to_string()]);
    }

    #[tokio::test]
    async fn did_web_with_port_goes_to_that_port() {
        // Without the override: did:web:127.0.0.1%3A<port> → https://127.0.0.1:<port>/… The
        // test server speaks plain http, so the TLS handshake fails: the error names the URL.
        let srv = TestServer::start().await;
        let did = format!("did:web:127.0.0.1%3A{}", srv.addr.port());
        let http = HttpClient::new(HttpSettings::default()).expect("http");
        let err = Resolver::new("http://127.0.0.1:1", http).resolve(&did).await.expect_err("tls");
        assert_eq!(err.label(), "http", "{err}");
        assert!(
            err.to_string().contains(&format!("https://127.0.0.1:{}/.well-known/did.json", srv.addr.port())),
            "{err}"
        );
    }

    #[tokio::test]
    async fn errors_are_specific_and_cached_briefly() {
        let srv = TestServer::start().await;
        let r = Resolver::with_cache(
            srv.url("/plc"),
            test_http(&srv),
            CacheSettings { error_ttl: Duration::from_millis(300), ..CacheSettings::default() },
        );
        let err = r.resolve(ALICE).await.expect_err("404");
        assert_eq!(err, IdentityError::NotFound(ALICE.into()));
        r.resolve(ALICE).await.expect_err("cached 404");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 1, "errors are cached");
        tokio::time::sleep(Duration::from_millis(350)).await;
        r.resolve(ALICE).await.expect_err("404 again");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "error entries expire");

        srv.set(&format!("/plc/{BOB}"), 500, "boom");
        assert_eq!(r.resolve(BOB).await.expect_err("500").label(), "bad_status");

        let carol = "did:plc:carolccccccccccccccccccc";
        srv.set(&format!("/plc/{carol}"), 200, "{not json");
        assert_eq!(r.resolve(carol).await.expect_err("bad json").label(), "invalid_document");

        let dave = "did:plc:davedddddddddddddddddddd";
        let key = PublicKey::K256(*k256_key("d").verifying_key());
        srv.set_json(&format!("/plc/{dave}"), &did_doc(ALICE, &key, "https://x", "d.test"));
        let err = r.resolve(dave).await.expect_err("id mismatch");
        assert_eq!(err.label(), "invalid_document");
        assert!(err.to_string().contains("document id"), "{err}");

        assert_eq!(r.resolve("did:key:zabc").await.expect_err("method").label(), "invalid_did");
        assert_eq!(r.resolve("did:plc:../../x").await.expect_err("syntax").label(), "invalid_did");
    }

    #[tokio::test]
    async fn bounded_cache_evicts_oldest() {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("k").verifying_key());
        for did in [ALICE, BOB] {
            srv.set_json(&format!("/plc/{did}"), &did_doc(did, &key, "https://x", "h.test"));
        }
        let r = Resolver::with_cache(
            srv.url("/plc"),
            test_http(&srv),
            CacheSettings { capacity: 1, ..CacheSettings::default() },
        );
        r.resolve(ALICE).await.expect("alice");
        r.resolve(BOB).await.expect("bob");
        r.resolve(ALICE).await.expect("alice again");
        assert_eq!(srv.count(&format!("/plc/{ALICE}")), 2, "alice was evicted by bob");
    }

    #[tokio::test]
    async fn handles_resolve_bidirectionally() {
        let srv = TestServer::start().await;
        let key = PublicKey::K256(*k256_key("h").verifying_key());
        srv.set_json(&format!("/plc/{ALICE}"), &did_doc(ALICE, &key, "https://x", "alice.test"));
        srv.set("/.well-known/atproto-did", 200, &format!("{ALICE}\n"));
        let r = resolver(&srv);
        let id = r.resolve_authority("Alice.Test").await.expect("handle resolves");
        assert_eq!(id.did, ALICE);
        assert!(srv.requests().contains(&"alice.test /.well-known/atproto-did".to_string()));

        let err = r.resolve_authority("mallory.test").await.expect_err("doc claims alice.test");
        assert_eq!(err.label(), "handle_mismatch");
        assert!(err.to_string().starts_with("failed to resolve handle mallory.test"), "{err}");

        assert_eq!(r.resolve_authority("not a handle").await.expect_err("syntax").label(), "invalid_handle");
        let well_known = srv.count("/.well-known/atproto-did");
        r.resolve_authority("alice.test").await.expect("cached handle");
        assert_eq!(srv.count("/.well-known/atproto-did"), well_known, "handle answers are cached");

        srv.set("/.well-known/atproto-did", 404, "");
        let err = r.resolve_handle("bob.test").await.expect_err("no well-known");
        assert_eq!(err.label(), "handle_resolution");
        assert!(err.to_string().contains("DNS TXT"), "{err}");
        srv.set("/.well-known/atproto-did", 200, "<html>");
        assert_eq!(r.resolve_handle("carol.test").await.expect_err("garbage").label(), "handle_resolution");
    }
}
