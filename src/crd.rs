//! `WorkflowRun` (`bobbin.dev/v1alpha1`): one tangled workflow run, the unit the controller
//! reconciles into a Tekton PipelineRun. Intake creates one per workflow of a pipeline; people can
//! create them by hand (`kubectl apply`) to run a workflow without tangled.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::pipeline::{ManualTrigger, PullRequestTrigger, PushTrigger, TriggerRepo};
use crate::model::{CloneOptions, Engine, StatusKind, Step, Workflow, WorkflowId};

/// Field manager for everything bobbin writes with server-side apply.
pub const FIELD_MANAGER: &str = "bobbin";

#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "bobbin.dev",
    version = "v1alpha1",
    kind = "WorkflowRun",
    plural = "workflowruns",
    shortname = "wfr",
    namespaced,
    status = "WorkflowRunStatus",
    printcolumn = r#"{"name":"Repo","type":"string","jsonPath":".spec.trigger.repo.repo"}"#,
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflow"}"#,
    printcolumn = r#"{"name":"Trigger","type":"string","jsonPath":".spec.trigger.kind"}"#,
    printcolumn = r#"{"name":"Commit","type":"string","jsonPath":".status.commit"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunSpec {
    /// The knot the pipeline came from, exactly as its event-stream source key (may hold `:port`).
    pub knot: String,
    /// The pipeline record key (a TID).
    pub pipeline_rkey: String,
    /// The workflow file name, e.g. `build.yml`: its identity in statuses, logs and the appview.
    pub workflow: String,
    pub trigger: TriggerSpec,
    pub engine: Engine,
    /// The image every step runs in (image engines); nixery builds it from `dependencies`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `kubernetes.io/arch` to schedule on; the operator's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    #[serde(default)]
    pub clone: CloneOptions,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dependencies: BTreeMap<String, Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    /// Whole-workflow deadline (Go duration syntax, e.g. `5m`, `1h30m`); the operator default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Name of the per-run Secret (same namespace) whose keys become step environment variables.
    /// Only the reference lives here, never a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Set to true to cancel the run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// What caused the run: the pipeline record's `triggerMetadata`, with a checked `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TriggerSpec {
    pub kind: TriggerKind,
    pub repo: TriggerRepo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTrigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PullRequestTrigger>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<ManualTrigger>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    Push,
    PullRequest,
    Manual,
}

impl TriggerKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "push" => Some(TriggerKind::Push),
            "pull_request" => Some(TriggerKind::PullRequest),
            "manual" => Some(TriggerKind::Manual),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Push => "push",
            TriggerKind::PullRequest => "pull_request",
            TriggerKind::Manual => "manual",
        }
    }
}

impl TriggerSpec {
    /// The commit the clone checks out: push `newSha`, pull request `sourceSha`, none for manual
    /// (the clone then fetches the default branch, as Go does).
    pub fn commit(&self) -> Option<&str> {
        match self.kind {
            TriggerKind::Push => self.push.as_ref().map(|p| p.new_sha.as_str()),
            TriggerKind::PullRequest => self.pull_request.as_ref().map(|p| p.source_sha.as_str()),
            TriggerKind::Manual => None,
        }
    }

    /// Build from the wire form; an unknown `kind` is the error text Go's clone step would print.
    pub fn from_metadata(meta: &crate::model::TriggerMetadata) -> Result<Self, String> {
        let kind =
            TriggerKind::parse(&meta.kind).ok_or_else(|| format!("unknown trigger kind: {}", meta.kind))?;
        let repo = meta.repo.clone().ok_or_else(|| "no repo data found".to_owned())?;
        match kind {
            TriggerKind::Push if meta.push.is_none() => return Err("push trigger metadata is nil".into()),
            TriggerKind::PullRequest if meta.pull_request.is_none() => {
                return Err("pull request trigger metadata is nil".into());
            }
            _ => {}
        }
        Ok(TriggerSpec {
            kind,
            repo,
            push: meta.push.clone(),
            pull_request: meta.pull_request.clone(),
            manual: meta.manual.clone(),
        })
    }
}

/// What `kubectl get wfr` / `describe wfr` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunStatus {
    /// pending | running | success | failed | timeout | cancelled
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<StatusKind>,
    /// Why the run failed (the `error` of the tangled status), or other detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The failing step's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_run_name: Option<String>,
    /// The trigger's commit, shortened, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One step's progress, in log order (`step_id` = index).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepState {
    pub name: String,
    pub kind: StepKind,
    pub phase: StepPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
}

/// `system` steps are injected by the runner (clone, nix setup); `user` steps come from the YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    System,
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepPhase {
    Waiting,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl WorkflowRunSpec {
    /// The spec for one parsed workflow of a pipeline.
    pub fn new(knot: &str, pipeline_rkey: &str, trigger: TriggerSpec, workflow: Workflow) -> Self {
        WorkflowRunSpec {
            knot: knot.to_owned(),
            pipeline_rkey: pipeline_rkey.to_owned(),
            workflow: workflow.name,
            trigger,
            engine: workflow.engine,
            image: workflow.image,
            architecture: workflow.architecture,
            clone: workflow.clone,
            dependencies: workflow.dependencies,
            environment: workflow.environment,
            steps: workflow.steps,
            timeout: None,
            secret_name: None,
            cancel: false,
        }
    }

    pub fn workflow_id(&self) -> WorkflowId {
        WorkflowId::new(&self.knot, &self.pipeline_rkey, &self.workflow)
    }
}

impl WorkflowRun {
    pub fn workflow_id(&self) -> WorkflowId {
        self.spec.workflow_id()
    }

    /// The phase, `pending` until the controller has written one.
    pub fn phase(&self) -> StatusKind {
        self.status.as_ref().and_then(|s| s.phase).unwrap_or(StatusKind::Pending)
    }
}

/// The CRD manifest, as `bobbin crds` prints it and `crds/` commits it.
pub fn crd_yaml() -> Result<String, crate::yaml::YamlError> {
    use kube::CustomResourceExt;
    crate::yaml::to_string(&WorkflowRun::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_matches_the_type() {
        let path = format!("{}/crds/workflowrun.yaml", env!("CARGO_MANIFEST_DIR"));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = crd_yaml().expect("crd serializes");
        assert!(
            committed == generated,
            "crds/workflowrun.yaml is out of date: run `cargo run -- crds > crds/workflowrun.yaml`"
        );
    }

    #[test]
    fn trigger_from_metadata_checks_kind_and_payload() {
        let meta: crate::model::TriggerMetadata = serde_json::from_value(serde_json::json!({
            "kind": "push", "repo": {"knot": "k", "did": "did:plc:a", "repo": "r"},
            "push": {"ref": "refs/heads/main", "newSha": "abc", "oldSha": "000"}
        }))
        .expect("meta");
        let t = TriggerSpec::from_metadata(&meta).expect("push");
        assert_eq!(t.commit(), Some("abc"));
        let mut bad = meta.clone();
        bad.push = None;
        assert_eq!(TriggerSpec::from_metadata(&bad).expect_err("nil"), "push trigger metadata is nil");
        bad.kind = "merge".into();
        assert_eq!(TriggerSpec::from_metadata(&bad).expect_err("kind"), "unknown trigger kind: merge");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The README's hand-made WorkflowRun parses into the type and translates into a PipelineRun.
    #[test]
    fn the_example_workflowrun_is_valid() {
        let path = format!("{}/examples/workflowrun.yaml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("example exists");
        let run: WorkflowRun = crate::yaml::from_str(&text).expect("example parses as a WorkflowRun");
        assert_eq!(run.spec.steps.len(), 2);
        assert_eq!(run.spec.trigger.kind, TriggerKind::Manual);
        let settings = crate::tekton::translate::TranslateSettings::from(&crate::config::Config::for_tests());
        let input = crate::tekton::translate::TranslateInput { run: &run, secret_keys: &[], queued: false };
        let pr = crate::tekton::translate::translate(&input, &settings).expect("translates");
        let tasks = pr.spec.pipeline_spec.expect("embedded pipeline").tasks;
        assert_eq!(
            tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["setup", "step-1-greet", "step-2-fail-on-purpose"]
        );
    }
}
