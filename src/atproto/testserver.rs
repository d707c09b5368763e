//! A tiny HTTP server on 127.0.0.1 for tests: canned responses by path (or path and query),
//! every request recorded as `"<host> <path?query>"` so tests can count lookups.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Default)]
struct Inner {
    routes: HashMap<String, (u16, String)>,
    requests: Vec<String>,
    delay: Option<Duration>,
}

#[derive(Clone)]
pub(crate) struct TestServer {
    inner: Arc<Mutex<Inner>>,
    pub(crate) addr: std::net::SocketAddr,
}

impl TestServer {
    pub(crate) async fn start() -> TestServer {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = axum::Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind test server");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("test server runs");
        });
        TestServer { inner, addr }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("test server lock")
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin())
    }

    /// Serve `body` with `status` for `key`: a path, or a path with its exact query string.
    pub(crate) fn set(&self, key: &str, status: u16, body: &str) {
        self.lock().routes.insert(key.to_string(), (status, body.to_string()));
    }

    pub(crate) fn set_json(&self, key: &str, body: &serde_json::Value) {
        self.set(key, 200, &body.to_string());
    }

    pub(crate) fn set_delay(&self, d: Duration) {
        self.lock().delay = Some(d);
    }

    pub(crate) fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    /// How many requests had exactly this path (query ignored).
    pub(crate) fn count(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.split_once(' ').is_some_and(|(_, pq)| pq.split('?').next() == Some(path)))
            .count()
    }
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let host =
        req.headers().get(axum::http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    let path = req.uri().path().to_string();
    let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or(path.clone());
    let (found, delay) = {
        let mut g = inner.lock().expect("test server lock");
        g.requests.push(format!("{host} {pq}"));
        let found = g.routes.get(&pq).or_else(|| g.routes.get(&path)).cloned();
        (found, g.delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match found {
        Some((status, body)) => (
            StatusCode::from_u16(status).expect("valid status"),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}
