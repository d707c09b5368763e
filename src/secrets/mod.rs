//! Secrets providers: encrypted SQLite and Kubernetes Secrets.
//!
//! A repo's secrets are scoped by `"<owner did>/<repo name>"` (spec §7). The XRPC handlers add,
//! list and remove them; the controller reads the values once per run to build the per-run Secret
//! that steps reference (the values never enter a PipelineRun or a WorkflowRun).

pub mod kubernetes;
pub mod sqlite;

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

/// One secret as `listSecrets` describes it (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    pub key: String,
    /// RFC 3339, seconds, UTC.
    pub created_at: String,
    /// DID of the actor who added it.
    pub created_by: String,
}

/// The provider behind the secrets XRPC methods (Go's `secrets.Manager`): add refuses an existing
/// key ([`SecretsError::AlreadyPresent`]), remove refuses a missing one ([`SecretsError::NotFound`]);
/// there is no update.
pub trait SecretsManager: SecretValues {
    fn add<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        value: &'a str,
        created_by: &'a str,
    ) -> BoxFuture<'a, Result<(), SecretsError>>;

    fn remove<'a>(&'a self, scope: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), SecretsError>>;

    /// The scope's secrets in storage order; empty when there are none.
    fn list<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<Vec<SecretEntry>, SecretsError>>;
}

/// Why the configured provider cannot start. Each message names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Key(#[from] sqlite::KeyError),
    #[error(
        "SPINDLE_SERVER_SECRETS_PROVIDER=kubernetes needs a Kubernetes client (in-cluster or KUBECONFIG)"
    )]
    NoCluster,
}

impl ProviderError {
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Key(e) => e.label(),
            ProviderError::NoCluster => "no_cluster",
        }
    }
}

/// The provider `SPINDLE_SERVER_SECRETS_PROVIDER` selects. `namespace` is bobbin's namespace (the
/// Kubernetes provider keeps its Secrets there). Fails at startup, not at the first request, when
/// the sqlite key is missing or malformed.
pub fn from_config(
    config: &crate::config::Config,
    store: crate::store::Store,
    client: Option<kube::Client>,
    namespace: &str,
) -> Result<std::sync::Arc<dyn SecretsManager>, ProviderError> {
    match config.secrets_provider {
        crate::config::SecretsProvider::Sqlite => {
            let key = sqlite::SecretsKey::from_config(config)?;
            Ok(std::sync::Arc::new(sqlite::SqliteSecrets::new(store, &key)))
        }
        crate::config::SecretsProvider::Kubernetes => {
            let client = client.ok_or(ProviderError::NoCluster)?;
            Ok(std::sync::Arc::new(kubernetes::KubeSecrets::new(client, namespace)))
        }
    }
}

/// Whether `key` can be a secret name: a shell identifier, `^[a-zA-Z_][a-zA-Z0-9_]*$`, because every
/// secret becomes an environment variable of every step (Go's `secrets.ValidateKey`).
pub fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shell_identifiers() {
        for ok in ["NPM_TOKEN", "_x", "a1", "Z"] {
            assert!(is_valid_key(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "É", "A.B", "$A"] {
            assert!(!is_valid_key(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_configured_provider_starts_or_says_why_not() {
        let (_dir, store) = crate::store::temp_store();
        let mut config = crate::config::Config::for_tests();
        config.secrets_key = None;
        let e = from_config(&config, store.clone(), None, "bobbin").err().expect("no key");
        assert!(e.to_string().contains("BOBBIN_SECRETS_KEY"), "{e}");
        config.secrets_key = Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into());
        let sqlite = from_config(&config, store.clone(), None, "bobbin").expect("sqlite");
        sqlite.add("did:plc:a/r", "K", "v", "did:plc:a").await.expect("add");
        let values: std::sync::Arc<dyn SecretValues> = sqlite;
        assert_eq!(values.values("did:plc:a/r").await.expect("values").len(), 1);
        config.secrets_provider = crate::config::SecretsProvider::Kubernetes;
        let e = from_config(&config, store, None, "bobbin").err().expect("no cluster");
        assert_eq!(e.label(), "no_cluster");
    }

    #[test]
    fn scope_is_a_clean_join() {
        assert_eq!(scope("did:plc:alice", "hello-spindle"), "did:plc:alice/hello-spindle");
    }
}
