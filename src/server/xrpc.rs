//! XRPC under `/xrpc/` (spec §6.4–6.8): `sh.tangled.owner` and the repo secrets methods.
//!
//! Checks run in the Go spindle's order (service auth, input, key, repo resolution, permission,
//! storage) and every failure is Go's `{"error", "message"}` body with Go's status code, so the
//! appview cannot tell the difference. Two improvements stay wire-compatible: the lexicon length
//! limits are enforced (B25) and an empty list is `[]`, never `null`.
//!
//! Service auth is [`crate::auth::ServiceAuth`]; at-uri → repo is [`crate::atproto::resolve_repo`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State, rejection::QueryRejection};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::atproto::{PdsClient, RepoError, Resolver, resolve_repo};
use crate::auth::ServiceAuth;

use crate::secrets::{SecretsError, SecretsManager, is_valid_key, scope};
use crate::store::Store;

pub const OWNER: &str = "sh.tangled.owner";
pub const ADD_SECRET: &str = "sh.tangled.repo.addSecret";
pub const REMOVE_SECRET: &str = "sh.tangled.repo.removeSecret";
pub const LIST_SECRETS: &str = "sh.tangled.repo.listSecrets";

/// Lexicon limits of `sh.tangled.repo.addSecret` (UTF-8 bytes, as atproto counts `maxLength`).
pub const KEY_MAX_LEN: usize = 50;
pub const VALUE_MAX_LEN: usize = 200;

/// What the XRPC methods need.
#[derive(Clone)]
pub struct XrpcState {
    /// `SPINDLE_SERVER_OWNER`.
    pub owner: String,
    /// Service-auth verification (audience `did:web:<SPINDLE_SERVER_HOSTNAME>`).
    pub auth: ServiceAuth,
    /// DID resolution for repo owners (shares its cache with `auth`).
    pub resolver: Resolver,
    /// Reads the `sh.tangled.repo` record from the owner's PDS.
    pub pds: PdsClient,
    /// Permission data (registered repos and collaborators).
    pub store: Store,
    pub secrets: Arc<dyn SecretsManager>,
}

impl std::fmt::Debug for XrpcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XrpcState").field("owner", &self.owner).finish_non_exhaustive()
    }
}

/// The XRPC routes, state applied.
pub fn router(state: XrpcState) -> Router {
    Router::new()
        .route(&format!("/xrpc/{OWNER}"), get(owner))
        .route(&format!("/xrpc/{ADD_SECRET}"), post(add_secret))
        .route(&format!("/xrpc/{REMOVE_SECRET}"), post(remove_secret))
        .route(&format!("/xrpc/{LIST_SECRETS}"), get(list_secrets))
        .with_state(state)
}

/// An XRPC failure: Go's status code, tag and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XrpcError {
    pub status: StatusCode,
    pub tag: &'static str,
    pub message: String,
}

impl XrpcError {
    fn new(status: StatusCode, tag: &'static str, message: impl Into<String>) -> Self {
        XrpcError { status, tag, message: message.into() }
    }

    fn generic(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, "Generic", message)
    }

    fn auth(text: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Auth", format!("signature verification failed: {text}"))
    }

    fn access_control(actor: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "AccessControl",
            format!("DID does not have sufficent access permissions for this operation: {actor}"),
        )
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// Go's `json.NewEncoder(w).Encode(v)`: compact JSON and a newline.
fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl IntoResponse for XrpcError {
    fn into_response(self) -> Response {
        json_response(self.status, &ErrorBody { error: self.tag, message: &self.message })
    }
}

type XrpcResult<T = Response> = Result<T, XrpcError>;

async fn owner(State(state): State<XrpcState>) -> XrpcResult {
    if state.owner.is_empty() {
        return Err(XrpcError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "OwnerNotFound",
            "owner not set for this service",
        ));
    }
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "owner": state.owner })))
}

/// Service auth: the actor DID, or 403 `Auth`.
async fn actor(state: &XrpcState, headers: &HeaderMap, lxm: &str) -> XrpcResult<String> {
    let authorization =
        headers.get(header::AUTHORIZATION).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    state.auth.verify(authorization.as_deref(), lxm).await.map_err(|e| XrpcError::auth(&e.to_string()))
}

/// Resolve `repo` and check that `actor` may manage its secrets; returns the secret scope.
async fn authorize(state: &XrpcState, repo: &str, actor: &str) -> XrpcResult<String> {
    let (owner, name) = resolve_repo(&state.resolver, &state.pds, repo).await.map_err(|e| match e {
        RepoError::InvalidUri(_) => XrpcError::new(StatusCode::BAD_REQUEST, "InvalidRepo", e.to_string()),
        // Identity, PDS and record problems (B25: an unexpected record type too) are 400 Generic.
        other => XrpcError::generic(StatusCode::BAD_REQUEST, other.to_string()),
    })?;
    let allowed = state
        .store
        .can_manage_secrets(&owner, &name, actor)
        .await
        .map_err(|e| XrpcError::generic(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !allowed {
        return Err(XrpcError::access_control(actor));
    }
    Ok(scope(&owner, &name))
}

fn decode<T: for<'de> Deserialize<'de>>(body: &Bytes) -> XrpcResult<T> {
    serde_json::from_slice(body).map_err(|e| XrpcError::generic(StatusCode::BAD_REQUEST, e.to_string()))
}

fn storage_error(e: SecretsError) -> XrpcError {
    XrpcError::generic(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// `sh.tangled.repo.addSecret` input. Absent fields decode as empty, as Go's decoder leaves them.
#[derive(Debug, Deserialize)]
struct AddSecretInput {
    #[serde(default)]
    repo: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

/// Lexicon limits and Go's key rule, in that order of severity (an empty key is Go's
/// "not a valid identifier").
fn validate_add(input: &AddSecretInput) -> XrpcResult<()> {
    let bad = |m: String| Err(XrpcError::generic(StatusCode::BAD_REQUEST, m));
    if input.key.len() > KEY_MAX_LEN {
        return bad(format!("key must be at most {KEY_MAX_LEN} bytes"));
    }
    if !is_valid_key(&input.key) {
        return bad("key is not a valid identifier".into());
    }
    if input.value.is_empty() {
        return bad("value must not be empty".into());
    }
    if input.value.len() > VALUE_MAX_LEN {
        return bad(format!("value must be at most {VALUE_MAX_LEN} bytes"));
    }
    Ok(())
}

async fn add_secret(State(state): State<XrpcState>, headers: HeaderMap, body: Bytes) -> XrpcResult {
    let actor = actor(&state, &headers, ADD_SECRET).await?;
    let input: AddSecretInput = decode(&body)?;
    validate_add(&input)?;
    let scope = authorize(&state, &input.repo, &actor).await?;
    state.secrets.add(&scope, &input.key, &input.value, &actor).await.map_err(storage_error)?;
    tracing::info!(%scope, key = %input.key, %actor, "secret added");
    Ok(StatusCode::OK.into_response())
}

#[derive(Debug, Deserialize)]
struct RemoveSecretInput {
    #[serde(default)]
    repo: String,
    #[serde(default)]
    key: String,
}

async fn remove_secret(State(state): State<XrpcState>, headers: HeaderMap, body: Bytes) -> XrpcResult {
    let actor = actor(&state, &headers, REMOVE_SECRET).await?;
    let input: RemoveSecretInput = decode(&body)?;
    let scope = authorize(&state, &input.repo, &actor).await?;
    state.secrets.remove(&scope, &input.key).await.map_err(storage_error)?;
    tracing::info!(%scope, key = %input.key, %actor, "secret removed");
    Ok(StatusCode::OK.into_response())
}

#[derive(Debug, Serialize)]
struct ListedSecret {
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "createdBy")]
    created_by: String,
    key: String,
    repo: String,
}

/// RFC 3339 with seconds as stored, or Go's zero time when it does not parse.
fn created_at(stored: &str) -> String {
    match stored.parse::<jiff::Timestamp>() {
        Ok(t) => crate::model::status::rfc3339_seconds(t),
        Err(_) => "0001-01-01T00:00:00Z".to_owned(),
    }
}

async fn list_secrets(
    State(state): State<XrpcState>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> XrpcResult {
    let actor = actor(&state, &headers, LIST_SECRETS).await?;
    let repo = query
        .ok()
        .and_then(|Query(q)| q.into_iter().find(|(k, _)| k == "repo").map(|(_, v)| v))
        .filter(|r| !r.is_empty())
        .ok_or_else(|| XrpcError::generic(StatusCode::BAD_REQUEST, "empty params"))?;
    let scope = authorize(&state, &repo, &actor).await?;
    let entries = state.secrets.list(&scope).await.map_err(storage_error)?;
    let secrets: Vec<ListedSecret> = entries
        .into_iter()
        .map(|e| ListedSecret {
            created_at: created_at(&e.created_at),
            created_by: e.created_by,
            key: e.key,
            repo: repo.clone(),
        })
        .collect();
    Ok(json_response(StatusCode::OK, &serde_json::json!({ "secrets": secrets })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(key: &str, value: &str) -> AddSecretInput {
        AddSecretInput { repo: String::new(), key: key.into(), value: value.into() }
    }

    #[test]
    fn add_inputs_follow_the_lexicon() {
        let msg = |i: AddSecretInput| validate_add(&i).err().map(|e| (e.status.as_u16(), e.message));
        assert_eq!(msg(input("NPM_TOKEN", "v")), None);
        assert_eq!(msg(input("", "v")), Some((400, "key is not a valid identifier".into())));
        assert_eq!(msg(input("1A", "v")), Some((400, "key is not a valid identifier".into())));
        assert_eq!(msg(input(&"K".repeat(50), "v")), None);
        assert_eq!(msg(input(&"K".repeat(51), "v")), Some((400, "key must be at most 50 bytes".into())));
        assert_eq!(msg(input("K", "")), Some((400, "value must not be empty".into())));
        assert_eq!(msg(input("K", &"v".repeat(200))), None);
        assert_eq!(msg(input("K", &"v".repeat(201))), Some((400, "value must be at most 200 bytes".into())));
    }

    #[test]
    fn created_at_is_seconds_or_zero_time() {
        assert_eq!(created_at("2025-12-01T14:03:22Z"), "2025-12-01T14:03:22Z");
        assert_eq!(created_at("2025-12-01T14:03:22.5+00:00"), "2025-12-01T14:03:22Z");
        assert_eq!(created_at("yesterday"), "0001-01-01T00:00:00Z");
    }
}
