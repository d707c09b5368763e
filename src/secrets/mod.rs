//! Secrets providers: encrypted SQLite and Kubernetes Secrets.
//!
//! A repo's secrets are scoped by `"<owner did>/<repo name>"` (spec §7). The XRPC handlers add,
//! list and remove them; the controller reads the values once per run to build the per-run Secret
//! that steps reference (the values never enter a PipelineRun or a WorkflowRun).

use std::collections::BTreeMap;

use futures::future::BoxFuture;

/// Why a secrets operation failed. `Display` is the XRPC `Generic` message where one is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretsError {
    #[error("key already present")]
    AlreadyPresent,
    #[error("key not found")]
    NotFound,
    #[error("{0}")]
    Backend(String),
}

/// The scope of a repo's secrets: a clean join of owner DID and repo name (spec §2.5.2, §7).
pub fn scope(owner_did: &str, repo_name: &str) -> String {
    format!("{}/{}", owner_did.trim_end_matches('/'), repo_name.trim_start_matches('/'))
}

/// Read access to secret values, as the controller needs it. Object-safe so the controller can
/// hold whichever provider is configured.
pub trait SecretValues: Send + Sync {
    /// Every secret of `scope` as key → value; an empty map when the repo has none.
    fn values<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<BTreeMap<String, String>, SecretsError>>;
}
