//! Checks on `manifests/`: every document parses into its real Kubernetes type, the Role grants
//! exactly the calls `bobbin serve` makes, the Deployment's settings load, and the CRD copy is current.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

fn dir() -> String {
    format!("{}/manifests", env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of every manifest file, as (file, document).
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir()).expect("manifests dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
        if name == "kustomization.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for doc in text.split("\n---\n") {
            let value: serde_yaml::Value =
                crate::yaml::from_str(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            out.push((name.clone(), value));
        }
    }
    out
}

fn typed<T: serde::de::DeserializeOwned>(docs: &[(String, serde_yaml::Value)], kind: &str) -> Vec<T> {
    docs.iter()
        .filter(|(_, d)| d["kind"].as_str() == Some(kind))
        .map(|(f, d)| crate::yaml::from_value(d.clone()).unwrap_or_else(|e| panic!("{f} ({kind}): {e}")))
        .collect()
}

#[test]
fn kustomization_lists_every_manifest() {
    let k: serde_yaml::Value = crate::yaml::from_str(
        &std::fs::read_to_string(format!("{}/kustomization.yaml", dir())).expect("read"),
    )
    .expect("yaml");
    let listed: Vec<&str> =
        k["resources"].as_sequence().expect("resources").iter().filter_map(|v| v.as_str()).collect();
    for file in &listed {
        assert!(std::path::Path::new(&format!("{}/{file}", dir())).exists(), "{file} is listed but missing");
    }
    for (file, _) in documents() {
        assert!(listed.contains(&file.as_str()), "{file} is not in kustomization.yaml");
    }
}

#[test]
fn the_crd_copy_is_current() {
    let copy = std::fs::read_to_string(format!("{}/crds/workflowrun.yaml", dir())).expect("copy");
    let generated = crate::crd::crd_yaml().expect("crd");
    assert!(
        copy == generated,
        "manifests/crds/workflowrun.yaml is stale: cargo run -- crds > manifests/crds/workflowrun.yaml"
    );
}

#[test]
fn every_document_is_a_valid_object() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().filter_map(|(_, d)| d["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(&kind), "no {kind}");
    }
    assert_eq!(typed::<Namespace>(&docs, "Namespace").len(), 1);
    assert_eq!(typed::<ServiceAccount>(&docs, "ServiceAccount").len(), 1);
    assert_eq!(typed::<PersistentVolumeClaim>(&docs, "PersistentVolumeClaim").len(), 1);
    assert_eq!(typed::<Service>(&docs, "Service").len(), 1);
    let bindings = typed::<RoleBinding>(&docs, "RoleBinding");
    assert_eq!(bindings[0].role_ref.name, "bobbin");
    assert!(typed::<Namespace>(&docs, "ClusterRole").is_empty(), "no ClusterRole is needed");
}

/// (API group, resource, verb, who) for every call `bobbin serve` makes, across all areas. The Role
/// must grant exactly these: a missing one fails at runtime, an extra one is privilege nobody uses.
/// API discovery (the startup checks for Tekton and the CRD) needs no rule.
const CALLS: &[(&str, &str, &str, &str)] = &[
    // controller: the kube-runtime Controller over WorkflowRuns (list + watch), finalizer, status.
    ("bobbin.dev", "workflowruns", "list", "controller watch; logs::LogService::resume_all"),
    ("bobbin.dev", "workflowruns", "watch", "controller watch"),
    ("bobbin.dev", "workflowruns", "patch", "controller finalizer add/remove"),
    ("bobbin.dev", "workflowruns", "delete", "controller::cleanup::delete_run (TTL)"),
    ("bobbin.dev", "workflowruns/status", "patch", "controller status (server-side apply)"),
    // intake
    ("bobbin.dev", "workflowruns", "create", "intake::pipeline RunCreator"),
    // controller: PipelineRuns
    ("tekton.dev", "pipelineruns", "get", "reconcile get_opt; logs follower (finished run)"),
    ("tekton.dev", "pipelineruns", "list", "controller owns() watch; queue::promote"),
    ("tekton.dev", "pipelineruns", "watch", "controller owns() watch"),
    ("tekton.dev", "pipelineruns", "create", "reconcile create"),
    ("tekton.dev", "pipelineruns", "patch", "queue::promote; reconcile cancel"),
    // TaskRuns: controller and logs
    ("tekton.dev", "taskruns", "get", "reconcile child references; logs follower"),
    ("tekton.dev", "taskruns", "list", "reconcile status mapping; logs follower"),
    ("tekton.dev", "taskruns", "watch", "controller watches() trigger"),
    // Pods: controller fail-fast, logs
    ("", "pods", "list", "reconcile fail-fast detection"),
    ("", "pods", "get", "logs follower (step container state)"),
    ("", "pods/log", "get", "logs follower log_stream"),
    // Secrets: controller per-run Secret, logs masking, the kubernetes secrets provider
    ("", "secrets", "create", "reconcile per-run Secret; secrets::kubernetes add"),
    ("", "secrets", "get", "logs masker; secrets::kubernetes load"),
    ("", "secrets", "update", "secrets::kubernetes add/remove (replace)"),
    ("", "secrets", "delete", "secrets::kubernetes remove of the last key"),
    // Events, Lease, startup
    ("events.k8s.io", "events", "create", "kube Recorder"),
    ("events.k8s.io", "events", "patch", "kube Recorder (repeats)"),
    ("coordination.k8s.io", "leases", "get", "controller::leader"),
    ("coordination.k8s.io", "leases", "create", "controller::leader"),
    ("coordination.k8s.io", "leases", "update", "controller::leader renew/release (replace)"),
    ("", "namespaces", "get", "controller::startup::check"),
];

#[test]
fn the_role_grants_exactly_the_calls_serve_makes() {
    let docs = documents();
    let role = typed::<Role>(&docs, "Role").pop().expect("a Role");
    let rules = role.rules.unwrap_or_default();
    let mut granted = std::collections::BTreeSet::new();
    for rule in &rules {
        for list in [
            &rule.verbs,
            rule.resources.as_ref().expect("resources"),
            rule.api_groups.as_ref().expect("groups"),
        ] {
            assert!(!list.iter().any(|v| v == "*"), "wildcard in {rule:?}");
        }
        assert!(
            rule.resource_names.as_ref().is_none_or(|n| n.is_empty()),
            "resourceNames pin names kustomize cannot rewrite: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(
                        granted.insert((group.clone(), resource.clone(), verb.clone())),
                        "{verb} {resource} ({group}) granted twice"
                    );
                }
            }
        }
    }
    let needed: std::collections::BTreeSet<(String, String, String)> =
        CALLS.iter().map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string())).collect();
    let missing: Vec<_> = CALLS
        .iter()
        .filter(|(g, r, v, _)| !granted.contains(&(g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert!(missing.is_empty(), "the Role does not grant: {missing:#?}");
    let unused: Vec<_> = granted.difference(&needed).collect();
    assert!(unused.is_empty(), "the Role grants what nothing calls (least privilege): {unused:#?}");
}

#[test]
fn every_rule_of_the_role_says_why() {
    let text = std::fs::read_to_string(format!("{}/rbac.yaml", dir())).expect("rbac.yaml");
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- apiGroups:") {
            let above = lines[..i].last().map(|l| l.trim_start()).unwrap_or_default();
            assert!(above.starts_with('#'), "rbac.yaml line {}: a rule without a comment above it", i + 1);
        }
    }
}

#[test]
fn the_deployment_is_locked_down_and_its_settings_load() {
    let docs = documents();
    let deployment = typed::<Deployment>(&docs, "Deployment").pop().expect("a Deployment");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let pod = spec.template.spec.expect("pod spec");
    assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().expect("container securityContext");
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));

    let env: BTreeMap<String, String> =
        c.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect();
    let configmap = typed::<ConfigMap>(&docs, "ConfigMap").pop().expect("a ConfigMap");
    let file = configmap.data.and_then(|d| d.get("config.yaml").cloned()).expect("config.yaml");
    let config = crate::config::Config::load(
        |k| if k == "BOBBIN_NAMESPACE" { Some("bobbin".into()) } else { env.get(k).cloned() },
        |_| Ok(file.clone()),
    )
    .expect("the manifests' settings load");
    assert_eq!(config.db_path.parent(), config.log_dir.parent(), "db and logs share the volume");
    // The sqlite secrets provider refuses to start without BOBBIN_SECRETS_KEY, so the key's
    // secretKeyRef must not be optional: a missing Secret then stops the pod before it starts,
    // saying which Secret, instead of a crash loop.
    if config.secrets_provider == crate::config::SecretsProvider::Sqlite {
        let key_ref = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "BOBBIN_SECRETS_KEY")
            .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
            .expect("the sqlite provider needs BOBBIN_SECRETS_KEY from a Secret");
        assert_ne!(key_ref.optional, Some(true), "BOBBIN_SECRETS_KEY must not be optional with sqlite");
        let mut with_key = env.clone();
        with_key.insert("BOBBIN_SECRETS_KEY".into(), "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into());
        let config = crate::config::Config::load(
            |k| if k == "BOBBIN_NAMESPACE" { Some("bobbin".into()) } else { with_key.get(k).cloned() },
            |_| Ok(file.clone()),
        )
        .expect("settings with the key");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::Store::open(dir.path().join("s.db")).expect("store");
        assert!(
            crate::secrets::from_config(&config, store, None, "bobbin").is_ok(),
            "the manifests' secrets provider starts once the key Secret exists"
        );
    }
    let mounts: Vec<&str> = c.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.iter().any(|m| config.db_path.starts_with(m)), "the database is on a mounted volume");
}
