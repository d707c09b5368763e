//! Unauthenticated record reads from a user's PDS (`com.atproto.repo.getRecord` and
//! `listRecords`), as the Go spindle does for repo and collaborator records.

use serde::Deserialize;

use super::http::{HttpClient, HttpError, encode_query_value};

/// One entry of `listRecords`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ListedRecord {
    pub uri: String,
    #[serde(default)]
    pub cid: String,
    pub value: serde_json::Value,
}

/// Why a PDS read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PdsError {
    #[error("invalid PDS endpoint {0:?}")]
    InvalidEndpoint(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The PDS answered with an XRPC error, e.g. `RecordNotFound` (HTTP 400).
    #[error("PDS returned HTTP {status}{}", xrpc_suffix(error, message))]
    Xrpc { status: u16, error: Option<String>, message: Option<String> },
    #[error("invalid PDS response: {0}")]
    InvalidResponse(String),
}

fn xrpc_suffix(error: &Option<String>, message: &Option<String>) -> String {
    match (error, message) {
        (Some(e), Some(m)) => format!(": {e}: {m}"),
        (Some(e), None) => format!(": {e}"),
        (None, Some(m)) => format!(": {m}"),
        (None, None) => String::new(),
    }
}

impl PdsError {
    pub fn label(&self) -> &'static str {
        match self {
            PdsError::InvalidEndpoint(_) => "invalid_endpoint",
            PdsError::Http(_) => "http",
            PdsError::Xrpc { error: Some(e), .. } if e == "RecordNotFound" => "record_not_found",
            PdsError::Xrpc { .. } => "xrpc",
            PdsError::InvalidResponse(_) => "invalid_response",
        }
    }

    /// The record (or repo) does not exist, as opposed to the PDS failing.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PdsError::Xrpc { error: Some(e), .. } if e == "RecordNotFound" || e == "RepoNotFound")
            || matches!(self, PdsError::Xrpc { status: 404, .. })
    }
}

#[derive(Deserialize)]
struct XrpcErrorBody {
    error: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct GetRecordOutput {
    value: serde_json::Value,
}

#[derive(Deserialize)]
struct ListRecordsOutput {
    records: Vec<ListedRecord>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Cheap to clone: shares the HTTP pool.
#[derive(Debug, Clone)]
pub struct PdsClient {
    http: HttpClient,
}

impl PdsClient {
    pub fn new(http: HttpClient) -> Self {
        PdsClient { http }
    }

    /// The `value` of one record.
    pub async fn get_record(
        &self,
        pds: &str,
        repo: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<serde_json::Value, PdsError> {
        let body = self
            .query(
                pds,
                "com.atproto.repo.getRecord",
                &[("repo", repo), ("collection", collection), ("rkey", rkey)],
            )
            .await?;
        let out: GetRecordOutput =
            serde_json::from_slice(&body).map_err(|e| PdsError::InvalidResponse(e.to_string()))?;
        Ok(out.value)
    }

    /// One page of a collection; the returned cursor is `None` on the last page.
    pub async fn list_records(
        &self,
        pds: &str,
        repo: &str,
        collection: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<ListedRecord>, Option<String>), PdsError> {
        let limit = limit.clamp(1, 100).to_string();
        let mut params = vec![("repo", repo), ("collection", collection), ("limit", limit.as_str())];
        if let Some(c) = cursor {
            params.push(("cursor", c));
        }
        let body = self.query(pds, "com.atproto.repo.listRecords", &params).await?;
        let out: ListRecordsOutput =
            serde_json::from_slice(&body).map_err(|e| PdsError::InvalidResponse(e.to_string()))?;
        // An empty or repeated cursor would loop forever in a paginating caller.
        let cursor = out.cursor.filter(|c| !c.is_empty() && Some(c.as_str()) != cursor);
        Ok((out.records, cursor))
    }

    async fn query(&self, pds: &str, nsid: &str, params: &[(&str, &str)]) -> Result<Vec<u8>, PdsError> {
        let base = pds.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) || base.contains(['?', '#']) {
            return Err(PdsError::InvalidEndpoint(pds.to_string()));
        }
        let query: Vec<String> =
            params.iter().map(|(k, v)| format!("{k}={}", encode_query_value(v))).collect();
        let url = format!("{base}/xrpc/{nsid}?{}", query.join("&"));
        let resp = self.http.get(&url, None).await?;
        if !resp.status.is_success() {
            let parsed: Option<XrpcErrorBody> = serde_json::from_slice(&resp.body).ok();
            let (error, message) = parsed.map(|b| (b.error, b.message)).unwrap_or((None, None));
            return Err(PdsError::Xrpc { status: resp.status.as_u16(), error, message });
        }
        Ok(resp.body.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atproto::http::HttpSettings;
    use crate::atproto::testserver::TestServer;
    use serde_json::json;

    fn client() -> PdsClient {
        PdsClient::new(HttpClient::new(HttpSettings::default()).expect("http"))
    }

    const REPO: &str = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";

    #[tokio::test]
    async fn get_record_returns_the_value() {
        let srv = TestServer::start().await;
        srv.set_json(
            "/xrpc/com.atproto.repo.getRecord?repo=did%3Aplc%3Aaliceaaaaaaaaaaaaaaaaaaa&collection=sh.tangled.repo&rkey=3m6pd65mx7k2b",
            &json!({"uri": "at://x", "cid": "bafy", "value": {"$type": "sh.tangled.repo", "name": "bobbin"}}),
        );
        let v = client()
            .get_record(&srv.url("/"), REPO, "sh.tangled.repo", "3m6pd65mx7k2b")
            .await
            .expect("record");
        assert_eq!(v, json!({"$type": "sh.tangled.repo", "name": "bobbin"}));
    }

    #[tokio::test]
    async fn get_record_errors() {
        let srv = TestServer::start().await;
        srv.set(
            "/xrpc/com.atproto.repo.getRecord",
            400,
            r#"{"error":"RecordNotFound","message":"Could not locate record"}"#,
        );
        let err = client().get_record(&srv.origin(), REPO, "c", "r").await.expect_err("not found");
        assert_eq!(err.label(), "record_not_found");
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "PDS returned HTTP 400: RecordNotFound: Could not locate record");

        srv.set("/xrpc/com.atproto.repo.getRecord", 502, "bad gateway");
        let err = client().get_record(&srv.origin(), REPO, "c", "r").await.expect_err("502");
        assert_eq!(err, PdsError::Xrpc { status: 502, error: None, message: None });

        srv.set("/xrpc/com.atproto.repo.getRecord", 200, r#"{"uri":"at://x"}"#);
        let err = client().get_record(&srv.origin(), REPO, "c", "r").await.expect_err("no value");
        assert_eq!(err.label(), "invalid_response");

        for bad in ["ftp://pds", "pds.example.com", "https://pds?x=1"] {
            let err = client().get_record(bad, REPO, "c", "r").await.expect_err("endpoint");
            assert_eq!(err.label(), "invalid_endpoint", "{bad}");
        }
    }

    #[tokio::test]
    async fn list_records_paginates() {
        let srv = TestServer::start().await;
        let base = "/xrpc/com.atproto.repo.listRecords?repo=did%3Aplc%3Aaliceaaaaaaaaaaaaaaaaaaa&collection=sh.tangled.repo.collaborator&limit=2";
        let rec = |i: u32| json!({"uri": format!("at://{REPO}/sh.tangled.repo.collaborator/{i}"), "cid": format!("c{i}"), "value": {"subject": format!("did:plc:{i}")}});
        srv.set_json(base, &json!({"records": [rec(1), rec(2)], "cursor": "p2"}));
        srv.set_json(&format!("{base}&cursor=p2"), &json!({"records": [rec(3)], "cursor": "p2"}));
        let c = client();
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let (records, next) = c
                .list_records(&srv.origin(), REPO, "sh.tangled.repo.collaborator", 2, cursor.as_deref())
                .await
                .expect("page");
            pages += 1;
            all.extend(records);
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(pages, 2, "a repeated cursor ends pagination");
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].cid, "c3");
        assert_eq!(all[0].value, json!({"subject": "did:plc:1"}));
        assert_eq!(all[1].uri, format!("at://{REPO}/sh.tangled.repo.collaborator/2"));
    }

    #[tokio::test]
    async fn list_records_clamps_limit_and_rejects_garbage() {
        let srv = TestServer::start().await;
        srv.set_json("/xrpc/com.atproto.repo.listRecords", &json!({"records": []}));
        let (records, cursor) =
            client().list_records(&srv.origin(), REPO, "c", 5000, None).await.expect("empty page");
        assert!(records.is_empty());
        assert_eq!(cursor, None);
        assert!(srv.requests()[0].contains("&limit=100"), "{:?}", srv.requests());
        srv.set_json("/xrpc/com.atproto.repo.listRecords", &json!({"records": [{"uri": 1}]}));
        let err = client().list_records(&srv.origin(), REPO, "c", 5, None).await.expect_err("garbage");
        assert_eq!(err.label(), "invalid_response");
    }
}
