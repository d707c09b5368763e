//! The one outbound HTTP client for identity and PDS lookups: hyper 1 with rustls (the TLS stack
//! kube already links), plain http allowed, a connect and a total timeout on every request and a
//! cap on the body size, so a slow or hostile server cannot stall or exhaust us.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Limits and test hooks for outbound requests.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// TCP (and TLS) connect timeout.
    pub connect_timeout: Duration,
    /// Whole request: connect, headers and body.
    pub request_timeout: Duration,
    /// Larger responses are refused: DID documents and records are a few KiB.
    pub max_body_bytes: usize,
    /// Dev/test only: send every did:web document and handle well-known fetch to this origin
    /// (e.g. `http://127.0.0.1:8080`) with the original host in the `Host` header, instead of
    /// `https://<host>`. Never set in production.
    pub web_origin_override: Option<String>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 1024 * 1024,
            web_origin_override: None,
        }
    }
}

/// Why an outbound request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("request to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("response from {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("failed to set up TLS: {0}")]
    Tls(String),
}

impl HttpError {
    pub fn label(&self) -> &'static str {
        match self {
            HttpError::InvalidUrl { .. } => "invalid_url",
            HttpError::Transport { .. } => "transport",
            HttpError::Timeout { .. } => "timeout",
            HttpError::TooLarge { .. } => "too_large",
            HttpError::Tls(_) => "tls",
        }
    }
}

/// A fully read response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: http::StatusCode,
    pub body: Bytes,
}

/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    settings: Arc<HttpSettings>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl HttpClient {
    /// Builds the client with the system's root certificates; fails if none can be loaded.
    pub fn new(settings: HttpSettings) -> Result<Self, HttpError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(4)
            .build(https);
        Ok(HttpClient { client, settings: Arc::new(settings) })
    }

    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// GET `url` and read the whole body, within the timeout and size limit. `host` overrides
    /// the `Host` header (used with [`HttpSettings::web_origin_override`]).
    pub async fn get(&self, url: &str, host: Option<&str>) -> Result<HttpResponse, HttpError> {
        let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(url, e.to_string()))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(invalid(url, "scheme must be http or https".into())),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid(url, "missing host".into()));
        }
        let mut req = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, concat!("bobbin/", env!("CARGO_PKG_VERSION")));
        if let Some(host) = host {
            req = req.header(http::header::HOST, host);
        }
        let req = req.body(Empty::new()).map_err(|e| invalid(url, e.to_string()))?;
        let limit = self.settings.max_body_bytes;
        let timeout = self.settings.request_timeout;
        let fetch = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Transport { url: url.to_string(), reason: error_chain(&e) })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), limit).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    HttpError::TooLarge { url: url.to_string(), limit }
                } else {
                    HttpError::Transport { url: url.to_string(), reason: e.to_string() }
                }
            })?;
            Ok(HttpResponse { status, body: body.to_bytes() })
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| HttpError::Timeout { url: url.to_string(), timeout })?
    }
}

fn invalid(url: &str, reason: String) -> HttpError {
    HttpError::InvalidUrl { url: url.to_string(), reason }
}

/// hyper's top-level error says little ("client error (Connect)"); the sources say why.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Percent-encode a query parameter value (everything except RFC 3986 unreserved characters).
pub fn encode_query_value(v: &str) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(v, SET).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::testserver::TestServer;

    fn client(settings: HttpSettings) -> HttpClient {
        HttpClient::new(settings).expect("client builds")
    }

    #[tokio::test]
    async fn get_reads_body_and_status() {
        let srv = TestServer::start().await;
        srv.set("/x", 200, "hello");
        let resp = client(HttpSettings::default()).get(&srv.url("/x"), None).await.expect("get");
        assert_eq!(resp.status, 200);
        assert_eq!(&resp.body[..], b"hello");
        let resp = client(HttpSettings::default()).get(&srv.url("/nope"), None).await.expect("get");
        assert_eq!(resp.status, 404);
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let srv = TestServer::start().await;
        srv.set("/big", 200, &"a".repeat(2000));
        let c = client(HttpSettings { max_body_bytes: 1000, ..HttpSettings::default() });
        let err = c.get(&srv.url("/big"), None).await.expect_err("too large");
        assert_eq!(err.label(), "too_large", "{err}");
    }

    #[tokio::test]
    async fn slow_server_times_out() {
        let srv = TestServer::start().await;
        srv.set("/slow", 200, "late");
        srv.set_delay(Duration::from_secs(5));
        let c =
            client(HttpSettings { request_timeout: Duration::from_millis(200), ..HttpSettings::default() });
        let err = c.get(&srv.url("/slow"), None).await.expect_err("timeout");
        assert_eq!(err.label(), "timeout", "{err}");
    }

    #[tokio::test]
    async fn bad_urls_and_refused_connections_are_clear_errors() {
        let c = client(HttpSettings::default());
        for url in ["ftp://x/y", "not a url", "http:///path"] {
            let err = c.get(url, None).await.expect_err("invalid");
            assert_eq!(err.label(), "invalid_url", "{url}: {err}");
        }
        // Bind then drop to get a port nobody listens on.
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let err = c.get(&format!("http://127.0.0.1:{port}/"), None).await.expect_err("refused");
        assert_eq!(err.label(), "transport", "{err}");
        assert!(err.to_string().contains("127.0.0.1"), "{err}");
    }

    #[tokio::test]
    async fn host_header_override_is_sent() {
        let srv = TestServer::start().await;
        srv.set("/h", 200, "ok");
        client(HttpSettings::default()).get(&srv.url("/h"), Some("alice.test")).await.expect("get");
        assert_eq!(srv.requests(), vec!["alice.test /h".to_string()]);
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(encode_query_value("did:plc:abc"), "did%3Aplc%3Aabc");
        assert_eq!(encode_query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(encode_query_value("sh.tangled-repo_~"), "sh.tangled-repo_~");
    }
}
