//! The HTTP server: motd, `/events`, XRPC, health and metrics, plus the routers other areas merge in
//! (`/logs/...`). Its routes, status codes and bodies are the Go spindle's (spec §6): chi's 404 text,
//! empty 405s, gorilla's 400 for a plain request to a WebSocket route and its same-origin check.

pub mod events;
pub mod recent;
pub mod xrpc;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::HttpMetrics;

/// The motd served on `/` (any method). The text after the logo is the Go spindle's.
pub const MOTD: &str = r#"
        _           _      _
       | |__   ___ | |__  | |__   (_) _ __
       | '_ \ / _ \| '_ \ | '_ \  | || '_ \
       | |_) | (_) | |_) || |_) | | || | | |
       |_.__/ \___/|_.__/ |_.__/  |_||_| |_|
          ===========================
           ))))))))))))))))))))))))
          ===========================

This is a spindle server. More info at https://tangled.sh/@tangled.sh/core/tree/master/docs/spindle

Most API routes are under /xrpc/
"#;

/// Metrics owned by the server itself.
#[derive(Debug, Clone, Default)]
pub struct ServerMetrics {
    pub http: Arc<HttpMetrics>,
    pub events: events::EventsMetrics,
}

impl ServerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        self.http.register(registry);
        self.events.register(registry);
    }
}

/// Everything [`app`] composes. `serve` builds these once at startup.
pub struct AppParts {
    /// State of `/events` (store, timings, metrics, shutdown).
    pub events: events::EventsState,
    /// State of the XRPC methods (owner, auth, repo resolution, permissions, secrets provider).
    pub xrpc: xrpc::XrpcState,
    /// Set by `serve` once its startup checks passed; `/readyz` answers 503 until then.
    pub ready: Arc<AtomicBool>,
    /// The registry every area registered into, rendered on `/metrics`.
    pub registry: crate::metrics::Shared,
    /// Request counters, applied to every route.
    pub http_metrics: Arc<HttpMetrics>,
    /// Routers of other areas with their state applied, e.g. `logs::router(...)`.
    pub extra: Vec<Router>,
}

/// The whole HTTP surface.
pub fn app(parts: AppParts) -> Router {
    let mut router = Router::new()
        .route("/", any(motd))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz).with_state(parts.ready))
        .route("/metrics", get(crate::metrics::handler).with_state(parts.registry))
        .merge(events::router(parts.events))
        .merge(xrpc::router(parts.xrpc));
    for extra in parts.extra {
        router = router.merge(extra);
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(parts.http_metrics, HttpMetrics::track))
}

/// Serve `app` on `listener` until `shutdown` is cancelled, then stop accepting and let in-flight
/// requests finish (WebSocket handlers watch the same token and end their streams).
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

async fn motd() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], MOTD).into_response()
}

async fn readyz(State(ready): State<Arc<AtomicBool>>) -> Response {
    if ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// Go's `http.NotFound`.
async fn not_found() -> Response {
    plain_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// Go's `http.Error`: the text plus a newline, as text/plain with nosniff.
fn plain_error(status: StatusCode, text: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        ],
        format!("{text}\n"),
    )
        .into_response()
}

/// A WebSocket handshake refused the way gorilla/websocket refuses it: the status text as the body
/// and `Sec-Websocket-Version: 13`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeRejected(pub StatusCode);

impl IntoResponse for HandshakeRejected {
    fn into_response(self) -> Response {
        let mut r = plain_error(self.0, self.0.canonical_reason().unwrap_or_default());
        r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
        r
    }
}

/// gorilla/websocket's handshake checks: a request that is not a WebSocket upgrade gets 400
/// `Bad Request`, and a browser `Origin` whose host differs from `Host` gets 403 `Forbidden`.
/// Shared by `/events` and `/logs`.
pub fn accept_websocket(
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: &HeaderMap,
) -> Result<WebSocketUpgrade, HandshakeRejected> {
    let upgrade = upgrade.map_err(|_| HandshakeRejected(StatusCode::BAD_REQUEST))?;
    if !same_origin(headers) {
        return Err(HandshakeRejected(StatusCode::FORBIDDEN));
    }
    Ok(upgrade)
}

/// No `Origin`, or an `Origin` URL whose host[:port] equals `Host` ignoring ASCII case.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    let Ok(uri) = origin.parse::<http::Uri>() else { return false };
    if uri.scheme().is_none() {
        return false;
    }
    let (Some(origin_host), Some(host)) = (uri.authority(), headers.get(header::HOST)) else {
        return false;
    };
    host.to_str().is_ok_and(|h| h.eq_ignore_ascii_case(origin_host.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn origin_check_matches_gorilla() {
        assert!(same_origin(&headers(&[("host", "spindle.example.com")])));
        assert!(same_origin(&headers(&[
            ("host", "Spindle.example.com"),
            ("origin", "https://spindle.example.com")
        ])));
        assert!(!same_origin(&headers(&[
            ("host", "spindle.example.com"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&headers(&[("host", "localhost:6555"), ("origin", "http://localhost:3000")])));
        assert!(same_origin(&headers(&[("host", "localhost:6555"), ("origin", "http://localhost:6555")])));
        assert!(!same_origin(&headers(&[("host", "a"), ("origin", "null")])));
        assert!(!same_origin(&headers(&[("host", "a.example"), ("origin", "a.example")])));
    }
}
