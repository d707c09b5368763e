//! Test fixtures: the recorded Tekton watch sequences (the builders on the types are in
//! [`crate::testkit`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;

use crate::crd::WorkflowRun;
use crate::model::{StatusFrame, StatusKind, StatusRecord};
use crate::store::Store;
use crate::tekton::{PipelineRun, TaskRun};

pub use crate::testkit::NAMESPACE;

/// The store has already seen `statuses` for `run`, in order (e.g. intake's `pending`).
pub async fn already_reported(store: &Store, run: &WorkflowRun, statuses: &[StatusKind]) {
    for &status in statuses {
        store
            .append_status(StatusRecord::new(&run.workflow_id(), status, Timestamp::now()))
            .await
            .unwrap_or_else(|e| panic!("append {status:?}: {e}"));
    }
}

/// What tangled saw: (status, error, exitCode) of every status event in the store.
pub async fn reported(store: &Store) -> Vec<(StatusKind, Option<String>, Option<i64>)> {
    store
        .events_after(0, 100)
        .await
        .expect("events")
        .into_iter()
        .map(|e| {
            let f: StatusFrame = serde_json::from_str(&e.frame).expect("frame");
            (f.event.status, f.event.error, f.event.exit_code)
        })
        .collect()
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
