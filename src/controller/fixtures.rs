//! Test fixtures: builders on the real types and the recorded Tekton watch sequences.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::crd::{TriggerKind, TriggerSpec, WorkflowRun, WorkflowRunSpec, WorkflowRunStatus};
use crate::model::pipeline::{PushTrigger, TriggerRepo};
use crate::model::{CloneOptions, Engine, StatusKind, Step};
use crate::plan::{Plan, PlanSettings};
use crate::tekton::{PipelineRun, TaskRun};

pub const NAMESPACE: &str = "bobbin-test";

impl WorkflowRun {
    /// A push-triggered `kubernetes`-engine run of `test.yml` on knot1 with no steps yet, as intake
    /// would create it (named, namespaced, with a uid and creation time).
    pub fn test(name: &str) -> Self {
        let spec = WorkflowRunSpec {
            knot: "knot1.tangled.sh".into(),
            pipeline_rkey: "3m734z2gwll22".into(),
            workflow: "test.yml".into(),
            trigger: TriggerSpec {
                kind: TriggerKind::Push,
                repo: TriggerRepo {
                    knot: "knot1.tangled.sh".into(),
                    did: "did:plc:rjnvgfygwwqc5hyfsxmecosf".into(),
                    repo: "hello-spindle".into(),
                    default_branch: String::new(),
                },
                push: Some(PushTrigger {
                    ref_: "refs/heads/main".into(),
                    new_sha: "356a192b7913b04c54574d18c28d46e6395428ab".into(),
                    old_sha: "b6589fc6ab0dc82cf12099d1c2d40ab994e8410c".into(),
                }),
                pull_request: None,
                manual: None,
            },
            engine: Engine::Kubernetes,
            image: Some("alpine:3.20".into()),
            architecture: None,
            clone: CloneOptions::default(),
            dependencies: BTreeMap::new(),
            environment: BTreeMap::new(),
            steps: Vec::new(),
            timeout: None,
            secret_name: None,
            cancel: false,
        };
        let mut run = WorkflowRun::new(name, spec);
        run.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            resource_version: Some("1".into()),
            creation_timestamp: Some(Time("2026-11-21T12:00:00Z".parse().expect("timestamp"))),
            ..ObjectMeta::default()
        };
        run
    }

    /// User steps named `names`, each running `echo <name>`.
    pub fn with_steps(mut self, names: &[&str]) -> Self {
        self.spec.steps = names
            .iter()
            .map(|n| Step { name: (*n).into(), command: format!("echo {n}"), environment: BTreeMap::new() })
            .collect();
        self
    }

    pub fn with_phase(mut self, phase: StatusKind) -> Self {
        self.status.get_or_insert_with(WorkflowRunStatus::default).phase = Some(phase);
        self
    }

    pub fn with_status(mut self, status: WorkflowRunStatus) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_finalizer(mut self) -> Self {
        self.metadata.finalizers = Some(vec![super::FINALIZER.into()]);
        self
    }

    pub fn created_at(mut self, at: &str) -> Self {
        self.metadata.creation_timestamp = Some(Time(at.parse().expect("timestamp")));
        self
    }

    pub fn cancelled(mut self) -> Self {
        self.spec.cancel = true;
        self
    }

    /// Its plan with default settings.
    pub fn plan(&self) -> Plan {
        crate::plan::plan(&self.spec, &PlanSettings::from(&crate::config::Config::for_tests()))
            .expect("plannable")
    }
}

/// One recorded watch event.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Seconds since the PipelineRun was created.
    pub t: f64,
    pub deleted: bool,
    pub object: Recorded,
}

#[derive(Debug, Clone)]
pub enum Recorded {
    PipelineRun(Box<PipelineRun>),
    TaskRun(Box<TaskRun>),
    Pod(Box<Pod>),
}

/// The events of `../shared/fixtures/tekton/<scenario>.jsonl`, in order.
pub fn watch_sequence(scenario: &str) -> Vec<WatchEvent> {
    let path = format!("{}/../shared/fixtures/tekton/{scenario}.jsonl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("fixture file");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            let object = v["object"].clone();
            let object = match v["kind"].as_str() {
                Some("PipelineRun") => {
                    Recorded::PipelineRun(Box::new(serde_json::from_value(object).expect("pr")))
                }
                Some("TaskRun") => Recorded::TaskRun(Box::new(serde_json::from_value(object).expect("tr"))),
                Some("Pod") => Recorded::Pod(Box::new(serde_json::from_value(object).expect("pod"))),
                other => panic!("unexpected kind {other:?}"),
            };
            WatchEvent { t: v["t"].as_f64().expect("t"), deleted: v["type"] == "DELETED", object }
        })
        .collect()
}

/// The cluster state a watcher has after some events: the latest of every object.
#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub pipeline_run: Option<PipelineRun>,
    pub task_runs: BTreeMap<String, TaskRun>,
    pub pods: BTreeMap<String, Pod>,
}

impl ClusterState {
    pub fn apply(&mut self, event: &WatchEvent) {
        match &event.object {
            Recorded::PipelineRun(pr) => {
                self.pipeline_run = if event.deleted { None } else { Some((**pr).clone()) };
            }
            Recorded::TaskRun(tr) => {
                let name = tr.metadata.name.clone().expect("name");
                if event.deleted {
                    self.task_runs.remove(&name);
                } else {
                    self.task_runs.insert(name, (**tr).clone());
                }
            }
            Recorded::Pod(pod) => {
                let name = pod.metadata.name.clone().expect("name");
                if event.deleted {
                    self.pods.remove(&name);
                } else {
                    self.pods.insert(name, (**pod).clone());
                }
            }
        }
    }

    pub fn task_runs(&self) -> Vec<TaskRun> {
        self.task_runs.values().cloned().collect()
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.pods.values().cloned().collect()
    }
}
