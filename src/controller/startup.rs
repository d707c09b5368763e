//! Startup checks: refuse to run, with an error that says what to install, when the cluster
//! cannot host bobbin (no Tekton, no WorkflowRun CRD, no namespace).
//!
//! The API checks use discovery (`/apis/<group>/<version>`), which every authenticated client may
//! read, so bobbin needs no ClusterRole for them.

use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};

/// Why the cluster cannot host bobbin.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "Tekton Pipelines is not installed: the API tekton.dev/v1 is not served (install Tekton Pipelines v0.44 or newer: https://tekton.dev/docs/installation/pipelines/)"
    )]
    NoTekton,
    #[error("the API tekton.dev/v1 does not serve {0}: Tekton Pipelines is too old or incomplete")]
    TektonIncomplete(&'static str),
    #[error(
        "the WorkflowRun CRD is not installed: the API bobbin.dev/v1alpha1 is not served (kubectl apply -f crds/workflowrun.yaml)"
    )]
    NoCrd,
    #[error("namespace {0:?} does not exist (create it, or set BOBBIN_NAMESPACE)")]
    NoNamespace(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
}

impl StartupError {
    pub fn label(&self) -> &'static str {
        match self {
            StartupError::NoTekton => "no_tekton",
            StartupError::TektonIncomplete(_) => "tekton_incomplete",
            StartupError::NoCrd => "no_crd",
            StartupError::NoNamespace(_) => "no_namespace",
            StartupError::Kube(_) => "kube",
        }
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Run every check; the first failure is the error.
pub async fn check(client: &Client, namespace: &str) -> Result<(), StartupError> {
    let tekton = client
        .list_api_group_resources("tekton.dev/v1")
        .await
        .map_err(|e| if not_found(&e) { StartupError::NoTekton } else { StartupError::Kube(e) })?;
    for needed in ["pipelineruns", "taskruns"] {
        if !tekton.resources.iter().any(|r| r.name == needed) {
            return Err(StartupError::TektonIncomplete(needed));
        }
    }
    let ours = client
        .list_api_group_resources("bobbin.dev/v1alpha1")
        .await
        .map_err(|e| if not_found(&e) { StartupError::NoCrd } else { StartupError::Kube(e) })?;
    if !ours.resources.iter().any(|r| r.name == "workflowruns") {
        return Err(StartupError::NoCrd);
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get(namespace).await {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => Err(StartupError::NoNamespace(namespace.to_owned())),
        // Not allowed to look: the first namespaced write will say it if it is missing.
        Err(kube::Error::Api(s)) if s.code == 403 => {
            tracing::warn!(namespace, "not allowed to read the namespace; skipping that check");
            Ok(())
        }
        Err(e) => Err(StartupError::Kube(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mock::{ApiServer, Exchange};

    fn resources(group_version: &str, names: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": names.iter().map(|n| serde_json::json!({
                "name": n, "singularName": "", "namespaced": true, "kind": "X", "verbs": ["get", "list"]
            })).collect::<Vec<_>>(),
        })
    }

    #[tokio::test]
    async fn all_present_passes() {
        let (client, server) = ApiServer::new(vec![
            Exchange::get("/apis/tekton.dev/v1")
                .respond(200, resources("tekton.dev/v1", &["pipelineruns", "taskruns"])),
            Exchange::get("/apis/bobbin.dev/v1alpha1")
                .respond(200, resources("bobbin.dev/v1alpha1", &["workflowruns"])),
            Exchange::get("/api/v1/namespaces/ci").respond(
                200,
                serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ci"}}),
            ),
        ]);
        check(&client, "ci").await.expect("passes");
        server.done().await;
    }

    #[tokio::test]
    async fn missing_tekton_says_what_to_install() {
        let (client, server) =
            ApiServer::new(vec![Exchange::get("/apis/tekton.dev/v1").fail(404, "NotFound")]);
        let e = check(&client, "ci").await.expect_err("no tekton");
        assert_eq!(e.label(), "no_tekton");
        assert!(e.to_string().contains("Tekton Pipelines is not installed"), "{e}");
        server.done().await;
    }

    #[tokio::test]
    async fn missing_crd_and_namespace() {
        let (client, server) = ApiServer::new(vec![
            Exchange::get("/apis/tekton.dev/v1")
                .respond(200, resources("tekton.dev/v1", &["pipelineruns", "taskruns"])),
            Exchange::get("/apis/bobbin.dev/v1alpha1").fail(404, "NotFound"),
        ]);
        assert_eq!(check(&client, "ci").await.expect_err("no crd").label(), "no_crd");
        server.done().await;

        let (client, server) = ApiServer::new(vec![
            Exchange::get("/apis/tekton.dev/v1")
                .respond(200, resources("tekton.dev/v1", &["pipelineruns", "taskruns"])),
            Exchange::get("/apis/bobbin.dev/v1alpha1")
                .respond(200, resources("bobbin.dev/v1alpha1", &["workflowruns"])),
            Exchange::get("/api/v1/namespaces/ci").fail(404, "NotFound"),
        ]);
        let e = check(&client, "ci").await.expect_err("no namespace");
        assert_eq!(e.to_string(), "namespace \"ci\" does not exist (create it, or set BOBBIN_NAMESPACE)");
        server.done().await;
    }
}
