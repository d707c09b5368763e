//! The spindle HTTP server over real sockets on 127.0.0.1 with real SQLite files: motd and routing
//! behaviour, `/events`, and the XRPC secrets methods with both providers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bobbin::atproto::{HttpClient, HttpSettings, PdsClient, Resolver};
use bobbin::auth::{ServiceAuth, service_did};
use bobbin::model::{StatusKind, StatusRecord, WorkflowId};
use bobbin::secrets::SecretsManager;
use bobbin::secrets::kubernetes::KubeSecrets;
use bobbin::secrets::sqlite::{SecretsKey, SqliteSecrets};
use bobbin::server::events::{EventsConfig, EventsState};
use bobbin::server::xrpc::XrpcState;
use bobbin::server::{AppParts, ServerMetrics};
use bobbin::store::Store;
use bobbin::store::events::StoredEvent;
use futures::StreamExt;
use http_body_util::BodyExt;
use prometheus_client::registry::Registry;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
const REPO_OWNER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
const COLLAB: &str = "did:plc:ogyr5xkxwnrekpk5yroudocu";
const STRANGER: &str = "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz";
const REPO_URI: &str = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3m6pd65mx7k2b";

fn fixture(path: &str) -> String {
    let full = format!("{}/../shared/spec/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&full).expect("fixture")
}

fn fixture_json(path: &str) -> serde_json::Value {
    serde_json::from_str(&fixture(path)).expect("fixture json")
}

// ---------------------------------------------------------------------------------------------
// A running server

/// The AT Protocol side of the world on 127.0.0.1: a PLC directory (`/plc/<did>`) serving DID
/// documents with real secp256k1 keys, and a PDS (`/xrpc/com.atproto.repo.getRecord`) holding the
/// fixture repo record. Tokens are minted and signed here exactly as a PDS would.
mod world {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use axum::extract::{Path, Query, State};
    use axum::response::{IntoResponse, Response};
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use bobbin::atproto::PublicKey;
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::Signer;

    pub const AUD: &str = "did:web:spindle.example.com";

    pub struct World {
        pub plc_url: String,
        keys: BTreeMap<String, SigningKey>,
        jti: AtomicU64,
    }

    struct Docs {
        docs: BTreeMap<String, serde_json::Value>,
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("valid scalar")
    }

    pub async fn start(dids: &[&str], repo_owner: &str, repo_rkey: &str) -> Arc<World> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let keys: BTreeMap<String, SigningKey> =
            dids.iter().enumerate().map(|(i, d)| (d.to_string(), key(i as u8 + 1))).collect();
        let docs = keys
            .iter()
            .map(|(did, k)| {
                let public = PublicKey::K256(*k.verifying_key());
                let doc = serde_json::json!({
                    "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
                    "id": did,
                    "alsoKnownAs": [format!("at://{}.test", &did[8..14])],
                    "verificationMethod": [{
                        "id": format!("{did}#atproto"), "type": "Multikey", "controller": did,
                        "publicKeyMultibase": public.to_multibase(),
                    }],
                    "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": origin}],
                });
                (did.clone(), doc)
            })
            .collect();
        let repo = (repo_owner.to_owned(), repo_rkey.to_owned());
        let app = axum::Router::new()
            .route(
                "/plc/{did}",
                axum::routing::get(|State(docs): State<Arc<Docs>>, Path(did): Path<String>| async move {
                    match docs.docs.get(&did) {
                        Some(doc) => axum::Json(doc.clone()).into_response(),
                        None => (http::StatusCode::NOT_FOUND, format!("DID not registered: {did}"))
                            .into_response(),
                    }
                }),
            )
            .with_state(Arc::new(Docs { docs }))
            .route(
                "/xrpc/com.atproto.repo.getRecord",
                axum::routing::get(move |Query(q): Query<BTreeMap<String, String>>| {
                    let repo = repo.clone();
                    async move { get_record(&q, &repo) }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Arc::new(World { plc_url: format!("{origin}/plc"), keys, jti: AtomicU64::new(0) })
    }

    fn get_record(q: &BTreeMap<String, String>, (owner, rkey): &(String, String)) -> Response {
        let field = |k: &str| q.get(k).map(String::as_str);
        assert_eq!(
            field("collection"),
            Some("sh.tangled.repo"),
            "the spindle always fetches sh.tangled.repo"
        );
        if field("repo") == Some(owner) && field("rkey") == Some(rkey) {
            axum::Json(serde_json::json!({
                "uri": format!("at://{owner}/sh.tangled.repo/{rkey}"),
                "cid": "bafyreib2rxk3rh6kzwq5iwn2ygtczmcrhpcxrnebzmnqtr2ebgbm7ak7oi",
                "value": {"$type": "sh.tangled.repo", "name": "hello-spindle", "knot": "knot1.tangled.sh",
                          "spindle": "spindle.example.com", "createdAt": "2025-11-28T10:00:00Z"},
            }))
            .into_response()
        } else {
            (
                http::StatusCode::BAD_REQUEST,
                axum::Json(
                    serde_json::json!({"error": "RecordNotFound", "message": "Could not locate record"}),
                ),
            )
                .into_response()
        }
    }

    impl World {
        /// A fresh, valid service-auth token from `did` for `lxm`, as the appview obtains one.
        pub fn token(&self, did: &str, lxm: &str) -> String {
            let now = jiff::Timestamp::now().as_second();
            self.sign(
                did,
                serde_json::json!({"iat": now, "iss": did, "aud": AUD, "exp": now + 60, "lxm": lxm}),
            )
        }

        /// Sign `payload` (a `jti` is added when absent) with `did`'s key.
        pub fn sign(&self, did: &str, payload: serde_json::Value) -> String {
            let key = self.keys.get(did).cloned().unwrap_or_else(|| key(99));
            self.sign_with(&key, payload)
        }

        /// Sign with a key that is not in any DID document.
        pub fn sign_with_stranger_key(&self, payload: serde_json::Value) -> String {
            self.sign_with(&key(200), payload)
        }

        fn sign_with(&self, key: &SigningKey, mut payload: serde_json::Value) -> String {
            if payload.get("jti").is_none() {
                payload["jti"] = format!("jti-{}", self.jti.fetch_add(1, Ordering::Relaxed)).into();
            }
            let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256K"}"#);
            let body = URL_SAFE_NO_PAD.encode(payload.to_string());
            let input = format!("{header}.{body}");
            let signature: k256::ecdsa::Signature = key.sign(input.as_bytes());
            format!("Bearer {input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
        }
    }
}

struct Server {
    world: Arc<world::World>,
    auth: ServiceAuth,
    base: String,
    ws: String,
    store: Store,
    ready: Arc<AtomicBool>,
    metrics: ServerMetrics,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

enum Provider {
    Sqlite,
    Kube(kube::Client),
}

async fn start(events: EventsConfig, provider: Provider) -> Server {
    let world = world::start(&[REPO_OWNER, COLLAB, STRANGER, OWNER], REPO_OWNER, "3m6pd65mx7k2b").await;
    let http = HttpClient::new(HttpSettings::default()).expect("http client");
    let resolver = Resolver::new(world.plc_url.clone(), http.clone());
    let auth = ServiceAuth::new(service_did("spindle.example.com"), resolver.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("spindle.db")).expect("store");
    seed_repo(&store).await;
    let secrets: Arc<dyn SecretsManager> = match provider {
        Provider::Sqlite => {
            Arc::new(SqliteSecrets::new(store.clone(), &SecretsKey::generate().expect("key")))
        }
        Provider::Kube(client) => Arc::new(KubeSecrets::new(client, "bobbin")),
    };
    let metrics = ServerMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let app = bobbin::server::app(AppParts {
        events: EventsState {
            store: store.clone(),
            config: events,
            metrics: metrics.events.clone(),
            shutdown: shutdown.clone(),
        },
        xrpc: XrpcState {
            owner: OWNER.into(),
            auth: auth.clone(),
            resolver,
            pds: PdsClient::new(http),
            store: store.clone(),
            secrets,
        },
        ready: ready.clone(),
        registry: Arc::new(registry),
        http_metrics: metrics.http.clone(),
        extra: vec![
            bobbin::logs::server::router(bobbin::logs::server::LogsState::new(
                store.clone(),
                bobbin::logs::hub::LogHub::new(64),
                &bobbin::logs::LogSettings::new(dir.path().join("logs")),
            )),
            axum::Router::new().route("/extra", axum::routing::get(|| async { "merged" })),
        ],
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(bobbin::server::serve(listener, app, shutdown.clone()));
    Server {
        world,
        auth,
        base: format!("http://{addr}"),
        ws: format!("ws://{addr}"),
        store,
        ready,
        metrics,
        shutdown,
        _dir: dir,
    }
}

async fn seed_repo(store: &Store) {
    store
        .call(|c| {
            c.execute(
                "INSERT INTO repos (knot, owner, name) VALUES ('knot1.tangled.sh', ?1, 'hello-spindle')",
                [REPO_OWNER],
            )?;
            c.execute(
                "INSERT INTO collaborators (repo_owner, repo_name, subject, author, rkey)
                 VALUES (?1, 'hello-spindle', ?2, ?1, '3m6pdcollab22')",
                [REPO_OWNER, COLLAB],
            )?;
            Ok(())
        })
        .await
        .expect("seed repo");
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn content_type(&self) -> &str {
        self.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

async fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<axum::body::Bytes>>();
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(http_body_util::Full::new(axum::body::Bytes::from(body.to_owned()))).expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes().to_vec();
    Reply { status, headers, body }
}

async fn get(url: &str) -> Reply {
    request("GET", url, &[], "").await
}

// ---------------------------------------------------------------------------------------------
// Routing

#[tokio::test]
async fn motd_health_metrics_and_go_routing_behaviour() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;

    for method in ["GET", "POST", "DELETE"] {
        let motd = request(method, &format!("{}/", s.base), &[], "").await;
        assert_eq!(motd.status, 200, "{method} /");
        assert!(motd.content_type().starts_with("text/plain"), "{}", motd.content_type());
        assert!(motd.text().contains("This is a spindle server."), "{}", motd.text());
        assert!(motd.text().contains("Most API routes are under /xrpc/"));
    }

    let missing = get(&format!("{}/nope", s.base)).await;
    assert_eq!((missing.status, missing.text().as_str()), (404, "404 page not found\n"));
    assert_eq!(missing.content_type(), "text/plain; charset=utf-8");

    for (method, path) in [
        ("POST", "/events"),
        ("POST", "/xrpc/sh.tangled.owner"),
        ("GET", "/xrpc/sh.tangled.repo.addSecret"),
        ("GET", "/xrpc/sh.tangled.repo.removeSecret"),
        ("POST", "/xrpc/sh.tangled.repo.listSecrets"),
    ] {
        let r = request(method, &format!("{}{path}", s.base), &[], "").await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert!(r.body.is_empty(), "{method} {path}: {}", r.text());
    }

    for path in ["/events", "/logs/knot1.tangled.sh/3m734z2gwll22/test.yml"] {
        let plain = get(&format!("{}{path}", s.base)).await;
        assert_eq!((plain.status, plain.text().as_str()), (400, "Bad Request\n"), "{path}");
        let wrong = request("POST", &format!("{}{path}", s.base), &[], "").await;
        assert_eq!((wrong.status, wrong.body.len()), (405, 0), "{path}");
    }

    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("origin", "https://evil.example"),
    ];
    for path in ["/events", "/logs/knot1.tangled.sh/3m734z2gwll22/test.yml"] {
        let cross = request("GET", &format!("{}{path}", s.base), &upgrade, "").await;
        assert_eq!(cross.status, 403, "cross-origin upgrade of {path}: {}", cross.text());
    }

    assert_eq!(get(&format!("{}/extra", s.base)).await.text(), "merged");
    assert_eq!(get(&format!("{}/healthz", s.base)).await.status, 200);
    assert_eq!(get(&format!("{}/readyz", s.base)).await.status, 503);
    s.ready.store(true, Ordering::Release);
    assert_eq!(get(&format!("{}/readyz", s.base)).await.status, 200);

    let metrics = get(&format!("{}/metrics", s.base)).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert!(text.contains(r#"bobbin_http_requests_total{method="GET",route="/",status="200"} 1"#), "{text}");
    assert!(text.contains(r#"route="/events",status="400""#), "{text}");
    assert!(text.contains("bobbin_events_subscribers"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// /events

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(s: &Server, query: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("{}/events{query}", s.ws)).await.expect("connect");
    ws
}

/// The next text frame (pings are skipped); panics after 5 s.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("stream open")
            .expect("frame");
        match msg {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn append(store: &Store, n: usize, workflow: &str) -> Vec<StoredEvent> {
    let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", workflow);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let status = if i % 2 == 0 { StatusKind::Pending } else { StatusKind::Running };
        out.push(
            store
                .append_status(StatusRecord::new(&id, status, jiff::Timestamp::now()))
                .await
                .expect("append"),
        );
    }
    out
}

#[tokio::test]
async fn backfill_pages_past_100_in_order_then_goes_live() {
    // A shared window far smaller than the backlog: the backfill pages from the store, then the
    // stream crosses over to the window for the newest events and live ones.
    let s = start(EventsConfig { recent_capacity: 16, ..EventsConfig::default() }, Provider::Sqlite).await;
    let events = append(&s.store, 250, "build.yml").await;
    let mut ws = connect(&s, &format!("?cursor={}", events[0].created - 1)).await;
    for e in &events {
        assert_eq!(next_text(&mut ws).await, e.frame, "backfill in order, frames verbatim");
    }
    let live = append(&s.store, 1, "test.yml").await;
    assert_eq!(next_text(&mut ws).await, live[0].frame);

    // Resuming from the last cursor we saw gets exactly the rest.
    drop(ws);
    let mut resumed = connect(&s, &format!("?cursor={}", events[119].created)).await;
    for e in events[120..].iter().chain(&live) {
        assert_eq!(next_text(&mut resumed).await, e.frame);
    }
    let marker = append(&s.store, 1, "marker.yml").await;
    assert_eq!(
        next_text(&mut resumed).await,
        marker[0].frame,
        "nothing between the rest and the next live event"
    );
}

#[tokio::test]
async fn cursor_zero_missing_or_junk_means_no_backfill_and_negative_means_everything() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    let old = append(&s.store, 3, "build.yml").await;
    let mut zero = connect(&s, "?cursor=0").await;
    let mut none = connect(&s, "").await;
    let mut junk = connect(&s, "?cursor=yesterday").await;
    let mut negative = connect(&s, "?cursor=-1").await;
    let mut future = connect(&s, &format!("?cursor={}", i64::MAX)).await;
    // The starting point is fixed before the handshake completes: no sleep needed.
    let live = append(&s.store, 1, "test.yml").await;
    for ws in [&mut zero, &mut none, &mut junk, &mut future] {
        assert_eq!(next_text(ws).await, live[0].frame, "no backfill, the live event first");
    }
    for e in old.iter().chain(&live) {
        assert_eq!(next_text(&mut negative).await, e.frame);
    }
}

#[tokio::test]
async fn idle_streams_are_pinged_with_an_empty_payload() {
    let config = EventsConfig { ping_interval: Duration::from_millis(100), ..EventsConfig::default() };
    let s = start(config, Provider::Sqlite).await;
    let mut ws = connect(&s, "").await;
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("ping in time");
    match msg.expect("open").expect("frame") {
        Message::Ping(payload) => assert!(payload.is_empty()),
        other => panic!("expected a ping, got {other:?}"),
    }
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_with_a_reason_and_others_keep_up() {
    let config = EventsConfig {
        send_timeout: Duration::from_secs(1),
        close_timeout: Duration::from_secs(30),
        ..EventsConfig::default()
    };
    let s = start(config, Provider::Sqlite).await;

    // A client with a tiny receive buffer that never reads until told to.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let addr = s.ws.trim_start_matches("ws://").parse().expect("addr");
    let stream = socket.connect(addr).await.expect("tcp connect");
    let (mut slow, _) =
        tokio_tungstenite::client_async(format!("{}/events", s.ws), stream).await.expect("ws handshake");
    let mut fast = connect(&s, "").await;

    // ~16 MB of frames: far more than the kernel buffers of a reader that does not read.
    let id = WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "big.yml");
    let big = "x".repeat(40_000);
    let mut frames = Vec::new();
    let reader = async {
        let mut got = 0;
        while got < 400 {
            next_text(&mut fast).await;
            got += 1;
        }
        got
    };
    let writer = async {
        for _ in 0..400 {
            let rec = StatusRecord::new(&id, StatusKind::Failed, jiff::Timestamp::now())
                .with_error(big.clone(), -1);
            frames.push(s.store.append_status(rec).await.expect("append").frame);
        }
    };
    let (got, ()) = tokio::join!(reader, writer);
    assert_eq!(got, 400, "the fast subscriber received everything");

    // The slow one was dropped: wait for the counter, then read what it was sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.metrics.events.slow_disconnects.get() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "slow subscriber not detected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut received = 0;
    let close = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), slow.next())
            .await
            .expect("frames in time")
            .expect("a close frame before the end")
            .expect("frame");
        match msg {
            Message::Text(t) => {
                assert_eq!(t.as_str(), frames[received], "frames up to the cut are intact and in order");
                received += 1;
            }
            Message::Close(frame) => break frame.expect("a close frame with a code"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(received < 400, "the slow client was cut off (received {received})");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("too slow"), "{}", close.reason);
    let _ = slow.close(None).await;

    // And the fast one still gets live events.
    let live = append(&s.store, 1, "after.yml").await;
    assert_eq!(next_text(&mut fast).await, live[0].frame);
}

#[tokio::test]
async fn subscribers_beyond_the_cap_get_503_until_a_slot_frees() {
    let s = start(EventsConfig { max_subscribers: 1, ..EventsConfig::default() }, Provider::Sqlite).await;
    let first = connect(&s, "").await;
    let refused =
        tokio_tungstenite::connect_async(format!("{}/events", s.ws)).await.expect_err("at capacity");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status().as_u16(), 503),
        other => panic!("expected an HTTP 503, got {other:?}"),
    }
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio_tungstenite::connect_async(format!("{}/events", s.ws)).await {
            Ok(_) => break,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "slot never freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn shutdown_closes_streams_with_going_away() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    let mut ws = connect(&s, "").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.shutdown.cancel();
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("close in time");
    match msg.expect("open").expect("frame") {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// XRPC

const ADD: &str = "sh.tangled.repo.addSecret";
const REMOVE: &str = "sh.tangled.repo.removeSecret";
const LIST: &str = "sh.tangled.repo.listSecrets";

/// POST an XRPC procedure with the raw `Authorization` header (or none).
async fn post_raw(s: &Server, method: &str, auth: Option<&str>, body: &str) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = auth {
        headers.push(("authorization", a));
    }
    request("POST", &format!("{}/xrpc/{method}", s.base), &headers, body).await
}

/// POST as `did`, with a fresh token signed by its key for this method.
async fn post_as(s: &Server, method: &str, did: &str, body: &serde_json::Value) -> Reply {
    post_raw(s, method, Some(&s.world.token(did, method)), &body.to_string()).await
}

async fn list_raw(s: &Server, auth: Option<&str>, repo: Option<&str>) -> Reply {
    let query = repo.map(|r| format!("?repo={}", urlencode(r))).unwrap_or_default();
    let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
    request("GET", &format!("{}/xrpc/{LIST}{query}", s.base), &headers, "").await
}

async fn list_as(s: &Server, did: &str, repo: Option<&str>) -> Reply {
    list_raw(s, Some(&s.world.token(did, LIST)), repo).await
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn assert_error(reply: &Reply, status: u16, expected: &serde_json::Value) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.content_type(), "application/json");
    assert_eq!(&reply.json(), expected);
}

fn generic(message: &str) -> serde_json::Value {
    serde_json::json!({"error": "Generic", "message": message})
}

#[tokio::test]
async fn owner_matches_the_fixture() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    let r = get(&format!("{}/xrpc/sh.tangled.owner", s.base)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type(), "application/json");
    assert_eq!(r.json(), fixture_json("xrpc/owner.response.json"));
}

/// add → list → duplicate → remove → remove again, as the owner and as a collaborator, each call
/// with its own signed service-auth token.
async fn round_trip(s: &Server) {
    let add = fixture_json("xrpc/addSecret.request.json");

    let r = post_as(s, ADD, REPO_OWNER, &add).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body.is_empty() && r.headers.get("content-type").is_none(), "empty 200");
    let second =
        serde_json::json!({"repo": REPO_URI, "key": "REGISTRY_PASSWORD", "value": "hunter2-registry"});
    assert_eq!(post_as(s, ADD, COLLAB, &second).await.status, 200);

    let list = list_as(s, REPO_OWNER, Some(REPO_URI)).await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(list.content_type(), "application/json");
    let mut got = list.json();
    let expected = fixture_json("xrpc/listSecrets.response.json");
    let entries = got["secrets"].as_array_mut().expect("array");
    entries.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
    assert_eq!(entries.len(), 2);
    for (g, e) in entries.iter_mut().zip(expected["secrets"].as_array().expect("fixture array")) {
        let created = g["createdAt"].as_str().expect("createdAt").to_owned();
        assert!(
            created.parse::<jiff::Timestamp>().is_ok() && created.ends_with('Z') && created.len() == 20,
            "{created}"
        );
        g["createdAt"] = e["createdAt"].clone();
        assert_eq!(g, e, "same shape and values as the fixture apart from the time");
    }

    let dup = post_as(s, ADD, REPO_OWNER, &add).await;
    assert_error(&dup, 500, &fixture_json("xrpc/error-key-already-present.json"));

    let remove = fixture_json("xrpc/removeSecret.request.json");
    let r = post_as(s, REMOVE, COLLAB, &remove).await;
    assert_eq!((r.status, r.body.len()), (200, 0), "{}", r.text());
    let again = post_as(s, REMOVE, REPO_OWNER, &remove).await;
    assert_error(&again, 500, &generic("key not found"));
    let left = list_as(s, REPO_OWNER, Some(REPO_URI)).await.json();
    assert_eq!(left["secrets"].as_array().map(Vec::len), Some(1));
    let last = serde_json::json!({"repo": REPO_URI, "key": "REGISTRY_PASSWORD"});
    assert_eq!(post_as(s, REMOVE, REPO_OWNER, &last).await.status, 200);
    assert_eq!(list_as(s, COLLAB, Some(REPO_URI)).await.json(), serde_json::json!({"secrets": []}));
}

#[tokio::test]
async fn sqlite_round_trip_and_no_plaintext_on_disk() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    round_trip(&s).await;
    // Keep one value stored while we inspect the files.
    let keep = serde_json::json!({"repo": REPO_URI, "key": "KEPT", "value": "plaintext-canary-7f3a9c"});
    assert_eq!(post_as(&s, ADD, REPO_OWNER, &keep).await.status, 200);

    let db = s.store.path().to_path_buf();
    let mut files = vec![db.clone()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let p = db.with_file_name(format!("spindle.db{suffix}"));
        if p.exists() {
            files.push(p);
        }
    }
    assert!(files.len() >= 2, "the WAL is inspected too: {files:?}");
    let contains = |bytes: &[u8], needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let all: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("read db file")).collect();
    assert!(all.iter().any(|b| contains(b, "KEPT")), "the scan sees the rows (key names are not secret)");
    for (file, bytes) in files.iter().zip(&all) {
        for value in ["plaintext-canary-7f3a9c", "npm_9c1f0b7e5d2a4c8e", "hunter2-registry"] {
            assert!(!contains(bytes, value), "{value} found in plaintext in {}", file.display());
        }
    }
}

#[tokio::test]
async fn every_error_body_matches_go() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    let add = |key: &str, value: &str| serde_json::json!({"repo": REPO_URI, "key": key, "value": value});

    // Auth comes first, before the body is even read.
    let now = jiff::Timestamp::now().as_second();
    let expired = s.world.sign(
        REPO_OWNER,
        serde_json::json!({"iat": now - 600, "iss": REPO_OWNER, "aud": world::AUD, "exp": now - 60, "lxm": ADD}),
    );
    let r = post_raw(&s, ADD, Some(&expired), "junk").await;
    assert_error(&r, 403, &fixture_json("xrpc/error-auth-expired.json"));

    // Input.
    let r = post_raw(&s, ADD, Some(&s.world.token(REPO_OWNER, ADD)), "{not json").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("Generic")), "{}", r.text());
    let r = post_as(&s, ADD, REPO_OWNER, &add("1NVALID", "v")).await;
    assert_error(&r, 400, &fixture_json("xrpc/error-invalid-key.json"));
    let r = post_as(&s, ADD, REPO_OWNER, &add("", "v")).await;
    assert_error(&r, 400, &fixture_json("xrpc/error-invalid-key.json"));
    let r = post_as(&s, ADD, REPO_OWNER, &add(&"K".repeat(51), "v")).await;
    assert_error(&r, 400, &generic("key must be at most 50 bytes"));
    let r = post_as(&s, ADD, REPO_OWNER, &add("K", "")).await;
    assert_error(&r, 400, &generic("value must not be empty"));
    let r = post_as(&s, ADD, REPO_OWNER, &add("K", &"v".repeat(201))).await;
    assert_error(&r, 400, &generic("value must be at most 200 bytes"));
    let r = list_as(&s, REPO_OWNER, None).await;
    assert_error(&r, 400, &generic("empty params"));
    let r = list_as(&s, REPO_OWNER, Some("")).await;
    assert_error(&r, 400, &generic("empty params"));

    // Repo resolution.
    let r =
        post_as(&s, ADD, REPO_OWNER, &serde_json::json!({"repo": "hello", "key": "K", "value": "v"})).await;
    assert_error(
        &r,
        400,
        &serde_json::json!({"error": "InvalidRepo", "message": "supplied at-uri is not a repo: hello"}),
    );
    let other = "at://did:plc:rjnvgfygwwqc5hyfsxmecosf/sh.tangled.repo/3zzzzzzzzzz22";
    let r = list_as(&s, REPO_OWNER, Some(other)).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("Generic")), "{}", r.text());
    assert!(
        r.json()["message"].as_str().is_some_and(|m| m.starts_with("failed to fetch repo record")),
        "{}",
        r.text()
    );
    let unknown_owner = "at://did:plc:nobodynobodynobodynobody/sh.tangled.repo/3m6pd65mx7k2b";
    let r = list_as(&s, REPO_OWNER, Some(unknown_owner)).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("Generic")), "{}", r.text());

    // Permission: neither owner nor collaborator, and the spindle owner has no implicit access.
    for who in [STRANGER, OWNER] {
        let mut expected = fixture_json("xrpc/error-access-control.json");
        expected["message"] =
            format!("DID does not have sufficent access permissions for this operation: {who}").into();
        assert_error(&post_as(&s, ADD, who, &add("K", "v")).await, 401, &expected);
        assert_error(&post_as(&s, REMOVE, who, &add("K", "v")).await, 401, &expected);
        assert_error(&list_as(&s, who, Some(REPO_URI)).await, 401, &expected);
    }
    let mut expected = fixture_json("xrpc/error-access-control.json");
    expected["message"] =
        format!("DID does not have sufficent access permissions for this operation: {COLLAB}").into();
    assert_eq!(
        expected,
        fixture_json("xrpc/error-access-control.json"),
        "the fixture names the collaborator"
    );
}

/// Every way service auth fails is a 403 `Auth` whose message is exactly the verifier's text.
#[tokio::test]
async fn service_auth_failures_map_to_403_auth() {
    let s = start(EventsConfig::default(), Provider::Sqlite).await;
    let body = serde_json::json!({"repo": REPO_URI, "key": "K", "value": "v"}).to_string();
    let now = jiff::Timestamp::now().as_second();
    let claims = |iss: &str, aud: &str, exp: i64, lxm: &str| serde_json::json!({"iat": now, "iss": iss, "aud": aud, "exp": exp, "lxm": lxm});
    let unknown = "did:plc:nobodynobodynobodynobody";
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing header", None),
        ("malformed", Some("Bearer not-a-jwt".into())),
        ("expired", Some(s.world.sign(REPO_OWNER, claims(REPO_OWNER, world::AUD, now - 60, ADD)))),
        (
            "wrong aud",
            Some(s.world.sign(REPO_OWNER, claims(REPO_OWNER, "did:web:other.example", now + 60, ADD))),
        ),
        ("wrong lxm", Some(s.world.sign(REPO_OWNER, claims(REPO_OWNER, world::AUD, now + 60, REMOVE)))),
        (
            "bad signature",
            Some(s.world.sign_with_stranger_key(claims(REPO_OWNER, world::AUD, now + 60, ADD))),
        ),
        ("unknown DID", Some(s.world.sign(unknown, claims(unknown, world::AUD, now + 60, ADD)))),
    ];
    for (name, header) in cases {
        // The same verifier, asked directly, says what the body must carry.
        let error = s.auth.verify(header.as_deref(), ADD).await.expect_err(name);
        let label = match name {
            "missing header" => "missing_token",
            "malformed" => "malformed",
            "expired" => "expired",
            "wrong aud" => "invalid_audience",
            "wrong lxm" => "wrong_method",
            "bad signature" => "bad_signature",
            _ => "identity",
        };
        assert_eq!(error.label(), label, "{name}: {error}");
        let text = error.to_string();
        let r = post_raw(&s, ADD, header.as_deref(), &body).await;
        assert_error(
            &r,
            403,
            &serde_json::json!({"error": "Auth", "message": format!("signature verification failed: {text}")}),
        );
        // listSecrets goes through the same gate.
        let r = list_raw(&s, header.as_deref(), Some(REPO_URI)).await;
        assert_eq!((r.status, r.json()["error"].as_str()), (403, Some("Auth")), "{name}: {}", r.text());
    }
    let expired = s.world.sign(REPO_OWNER, claims(REPO_OWNER, world::AUD, now - 60, ADD));
    assert_eq!(s.auth.verify(Some(&expired), ADD).await, Err(bobbin::auth::AuthError::Expired));

    // A valid token is accepted once; replaying it is refused.
    let token = s.world.token(REPO_OWNER, ADD);
    assert_eq!(post_raw(&s, ADD, Some(&token), &body).await.status, 200);
    let replay = post_raw(&s, ADD, Some(&token), &body).await;
    assert_eq!((replay.status, replay.json()["error"].as_str()), (403, Some("Auth")));
}

// ---------------------------------------------------------------------------------------------
// Kubernetes provider behind the real handlers: a mocked API server that keeps one Secret.

mod fake_api {
    use http::{Method, Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use kube::client::Body;

    pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("json")))
            .expect("response")
    }

    fn not_found() -> Response<Body> {
        json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}),
        )
    }

    /// Serve Secret requests in namespace `bobbin`, keeping state, and return the sequence of
    /// (method, path) seen so the test can assert every call.
    pub async fn serve(
        mut handle: Handle,
        until: tokio_util::sync::CancellationToken,
    ) -> Vec<(Method, String)> {
        let mut secret: Option<serde_json::Value> = None;
        let mut version = 0u64;
        let mut seen = Vec::new();
        loop {
            let next = tokio::select! {
                n = handle.next_request() => n,
                () = until.cancelled() => break,
            };
            let Some((req, send)) = next else { break };
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            assert!(path.starts_with("/api/v1/namespaces/bobbin/secrets"), "{path}");
            let bytes = req.into_body().collect().await.expect("body").to_bytes();
            let body: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("json")
            };
            seen.push((method.clone(), path.clone()));
            let response = match method {
                Method::GET => secret.as_ref().map_or_else(not_found, |s| json(StatusCode::OK, s)),
                Method::POST | Method::PUT => {
                    if method == Method::PUT {
                        let current = secret.as_ref().expect("PUT only on an existing Secret");
                        assert_eq!(
                            body["metadata"]["resourceVersion"],
                            current["metadata"]["resourceVersion"]
                        );
                    }
                    assert!(
                        path.ends_with(body["metadata"]["name"].as_str().expect("name"))
                            || method == Method::POST
                    );
                    version += 1;
                    let mut stored = body.clone();
                    stored["metadata"]["resourceVersion"] = version.to_string().into();
                    secret = Some(stored.clone());
                    json(if method == Method::POST { StatusCode::CREATED } else { StatusCode::OK }, &stored)
                }
                Method::DELETE => {
                    secret = None;
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Success"}),
                    )
                }
                other => panic!("unexpected {other}"),
            };
            send.send_response(response);
        }
        seen
    }
}

#[tokio::test]
async fn kubernetes_round_trip_through_xrpc() {
    let (service, handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
    let client = kube::Client::new(service, "default");
    let until = CancellationToken::new();
    let api = tokio::spawn(fake_api::serve(handle, until.clone()));
    let s = start(EventsConfig::default(), Provider::Kube(client)).await;
    round_trip(&s).await;
    until.cancel();
    let seen = api.await.expect("fake api");

    let name = bobbin::secrets::kubernetes::secret_name("did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle");
    let one = format!("/api/v1/namespaces/bobbin/secrets/{name}");
    let all = "/api/v1/namespaces/bobbin/secrets".to_owned();
    use http::Method as M;
    let expected: Vec<(M, String)> = vec![
        (M::GET, one.clone()),
        (M::POST, all), // add NPM_TOKEN: create
        (M::GET, one.clone()),
        (M::PUT, one.clone()), // add REGISTRY_PASSWORD: replace
        (M::GET, one.clone()), // list
        (M::GET, one.clone()), // duplicate add: refused, no write
        (M::GET, one.clone()),
        (M::PUT, one.clone()), // remove NPM_TOKEN
        (M::GET, one.clone()), // remove again: not found
        (M::GET, one.clone()), // list
        (M::GET, one.clone()),
        (M::DELETE, one.clone()), // remove the last key: delete
        (M::GET, one.clone()),    // list: empty
    ];
    assert_eq!(seen, expected);
}
