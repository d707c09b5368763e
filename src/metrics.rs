//! Prometheus metrics: one shared registry, served on `/metrics`.
//!
//! Each area defines its own metric struct with `register(&self, &mut Registry)`; `serve` builds one
//! [`Registry`], lets every area register into it, then hands it to the server behind [`Shared`].
//! This module also holds the HTTP request metrics, which belong to no single area.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The registry as the server holds it: built once at startup, read on every scrape.
pub type Shared = Arc<Registry>;

/// Content type of the OpenMetrics text exposition that `prometheus_client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `/metrics` body for `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Labels of one HTTP request: the route pattern (not the raw path, so cardinality stays bounded).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

/// Request counts and latencies for every route the server answers.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RequestLabels, Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bobbin_http_requests",
            "HTTP requests answered, by method, route and status",
            self.requests.clone(),
        );
        registry.register(
            "bobbin_http_request_duration_seconds",
            "Time to produce the response head (WebSocket routes: until the upgrade)",
            self.duration.clone(),
        );
    }

    /// Middleware recording every request; apply with `axum::middleware::from_fn_with_state`.
    pub async fn track(State(metrics): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
        let started = Instant::now();
        let method = method_label(req.method()).to_owned();
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "unmatched".to_owned());
        let response = next.run(req).await;
        let labels = RequestLabels { method, route, status: response.status().as_u16() };
        metrics.requests.get_or_create(&labels).inc();
        metrics.duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        response
    }
}

/// Standard methods by name; anything else (`/` accepts any method) as `other`, so a client
/// inventing methods cannot grow the label set.
fn method_label(method: &http::Method) -> &'static str {
    use http::Method as M;
    match *method {
        M::GET => "GET",
        M::HEAD => "HEAD",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

/// `GET /metrics`.
pub async fn handler(State(registry): State<Shared>) -> Response {
    ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let mut registry = Registry::default();
        let http = HttpMetrics::default();
        http.register(&mut registry);
        let labels = RequestLabels { method: "GET".into(), route: "/".into(), status: 200 };
        http.requests.get_or_create(&labels).inc();
        http.duration.get_or_create(&labels).observe(0.01);
        let text = render(&registry);
        assert!(
            text.contains(r#"bobbin_http_requests_total{method="GET",route="/",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("bobbin_http_request_duration_seconds_count"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(method_label(&http::Method::from_bytes(b"BREW").expect("method")), "other");
        assert_eq!(method_label(&http::Method::POST), "POST");
    }
}
