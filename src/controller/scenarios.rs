//! Reconcile scenarios against a scripted API server: every request the controller makes is
//! asserted (method, path and query, body), and a missing or extra one fails the test.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use super::fixtures::{ClusterState, NAMESPACE, already_reported, reported, watch_sequence};
use super::metrics::ControllerMetrics;
use super::mock::{ApiServer, Exchange};
use super::queue::QueueKick;
use super::reconcile::{Context, StartedRun, reconcile};
use super::status::{Observation, WORKFLOW_FAILED};
use crate::crd::{WorkflowRun, WorkflowRunStatus};
use crate::model::StatusKind;
use crate::secrets::{SecretValues, SecretsError};
use crate::store::Store;
use crate::tekton::PipelineRun;
use crate::tekton::translate::pipeline_run_name;

const PRS: &str = "/apis/tekton.dev/v1/namespaces/bobbin-test/pipelineruns";
const TRS: &str = "/apis/tekton.dev/v1/namespaces/bobbin-test/taskruns";
const PODS: &str = "/api/v1/namespaces/bobbin-test/pods";
const SECRETS: &str = "/api/v1/namespaces/bobbin-test/secrets";
const RUNS: &str = "/apis/bobbin.dev/v1alpha1/namespaces/bobbin-test/workflowruns";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/bobbin-test/events?";

/// The repo secrets the scenarios' repo has.
struct FixedSecrets(BTreeMap<String, String>);

impl SecretValues for FixedSecrets {
    fn values<'a>(&'a self, scope: &'a str) -> BoxFuture<'a, Result<BTreeMap<String, String>, SecretsError>> {
        let values = if scope == "did:plc:rjnvgfygwwqc5hyfsxmecosf/hello-spindle" {
            self.0.clone()
        } else {
            BTreeMap::new()
        };
        Box::pin(async move { Ok(values) })
    }
}

struct Harness {
    ctx: Arc<Context>,
    store: Store,
    started: Arc<Mutex<Vec<StartedRun>>>,
    _dir: tempfile::TempDir,
}

fn harness(client: Client, store: Option<(tempfile::TempDir, Store)>) -> Harness {
    let (dir, store) = store.unwrap_or_else(crate::store::temp_store);
    let started = Arc::new(Mutex::new(Vec::new()));
    let seen = started.clone();
    let secrets = FixedSecrets([("DEPLOY_TOKEN".to_owned(), "hunter2".to_owned())].into());
    let ctx = Context::new(
        client,
        NAMESPACE.into(),
        &crate::config::Config::for_tests(),
        store.clone(),
        Arc::new(secrets),
        QueueKick::default(),
        Arc::new(ControllerMetrics::default()),
        Arc::new(move |run: StartedRun| seen.lock().expect("lock").push(run)),
    );
    Harness { ctx: Arc::new(ctx), store, started, _dir: dir }
}

async fn intake_reported_pending(store: &Store, run: &WorkflowRun) {
    already_reported(store, run, &[StatusKind::Pending]).await;
}

async fn reconcile_once(h: &Harness, run: &WorkflowRun) -> Action {
    tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(DeserializeGuard(Ok(run.clone()))), h.ctx.clone()),
    )
    .await
    .expect("reconcile finished in time")
    .expect("reconcile succeeded")
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

/// What the server answers to a write on the run (its content does not matter to the controller).
fn ok_run() -> Value {
    serde_json::to_value(run()).expect("json")
}

fn run() -> WorkflowRun {
    WorkflowRun::test("wf").with_steps(&["build", "boom", "never"]).with_finalizer()
}

fn pr_name() -> String {
    pipeline_run_name(&run())
}

fn selector() -> String {
    format!("?&labelSelector=tekton.dev%2FpipelineRun%3D{}", pr_name())
}

fn status_path() -> String {
    format!("{RUNS}/wf/status?&force=true&fieldManager=bobbin")
}

/// The recorded per-step-fail PipelineRun after `n` events, renamed to what bobbin would name it
/// (its TaskRuns still match through `childReferences`).
fn recorded(n: usize) -> (PipelineRun, Vec<Value>) {
    let mut state = ClusterState::default();
    for e in watch_sequence("per-step-fail").iter().take(n) {
        state.apply(e);
    }
    let mut pr = state.pipeline_run.clone().expect("a PipelineRun");
    pr.metadata.name = Some(pr_name());
    pr.metadata.namespace = Some(NAMESPACE.into());
    let trs = state.task_runs().into_iter().map(|t| serde_json::to_value(t).expect("json")).collect();
    (pr, trs)
}

fn observe(exchanges: &mut Vec<Exchange>, pr: &PipelineRun, task_runs: Vec<Value>) {
    exchanges.push(
        Exchange::get(&format!("{PRS}/{}", pr_name())).respond(200, serde_json::to_value(pr).expect("json")),
    );
    exchanges
        .push(Exchange::get(&format!("{TRS}{}", selector())).respond(200, list("TaskRunList", task_runs)));
    exchanges.push(Exchange::get(&format!("{PODS}{}", selector())).respond(200, list("PodList", vec![])));
}

fn event(reason: &str, type_: &str) -> Exchange {
    Exchange::post(EVENTS)
        .body(json!({"reason": reason, "type": type_, "action": "Report", "reportingController": "bobbin",
            "regarding": {"kind": "WorkflowRun", "name": "wf", "namespace": NAMESPACE}}))
        .respond(
            201,
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "wf.1"}}),
        )
}

/// The PipelineRun the server echoes back after a create.
fn created_pr() -> PipelineRun {
    let mut pr = PipelineRun::new(&pr_name(), Default::default());
    pr.metadata.namespace = Some(NAMESPACE.into());
    pr.spec.status = Some("PipelineRunPending".into());
    pr.metadata.owner_references = crate::tekton::translate::owner_reference(&run()).map(|o| vec![o]);
    pr
}

#[tokio::test]
async fn someone_elses_pipeline_run_is_never_touched() {
    let mut theirs = created_pr();
    if let Some(o) = theirs.metadata.owner_references.as_mut().and_then(|v| v.first_mut()) {
        o.uid = "uid-other".into();
    }
    let message = format!("PipelineRun {} belongs to another WorkflowRun", pr_name());
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name()))
            .respond(200, serde_json::to_value(&theirs).expect("json")),
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "failed", "message": message}}))
            .respond(200, ok_run()),
        event("Failed", "Warning"),
    ]);
    let h = harness(client, None);
    intake_reported_pending(&h.store, &run()).await;
    reconcile_once(&h, &run()).await;
    server.done().await;
}

#[tokio::test]
async fn first_reconcile_creates_the_secret_and_a_queued_pipeline_run() {
    let run = run();
    let pr = serde_json::to_value(created_pr()).expect("json");
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name())).fail(404, "NotFound"),
        Exchange::post(&format!("{SECRETS}?"))
            .body(json!({
                "metadata": {"name": format!("{}-secrets", pr_name()), "namespace": NAMESPACE,
                    "ownerReferences": [{"apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun", "name": "wf",
                        "uid": "uid-wf", "controller": true, "blockOwnerDeletion": true}]},
                "data": {"DEPLOY_TOKEN": "aHVudGVyMg=="}}))
            .respond(201, json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})),
        Exchange::post(&format!("{PRS}?"))
            .body(json!({
                "metadata": {"name": pr_name(), "namespace": NAMESPACE,
                    "labels": {"bobbin.dev/workflowrun": "wf", "app.kubernetes.io/managed-by": "bobbin"},
                    "annotations": {"bobbin.dev/queued-at": "2026-11-21T12:00:00Z"},
                    "ownerReferences": [{"kind": "WorkflowRun", "name": "wf", "uid": "uid-wf"}]},
                "spec": {"status": "PipelineRunPending"}}))
            .respond(201, pr),
        Exchange::get(&format!("{TRS}{}", selector())).respond(200, list("TaskRunList", vec![])),
        Exchange::get(&format!("{PODS}{}", selector())).respond(200, list("PodList", vec![])),
        Exchange::patch(&status_path())
            .content_type("application/apply-patch+yaml")
            .body(json!({"apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun", "status": {
                "phase": "pending", "pipelineRunName": pr_name(), "commit": "356a192",
                "message": "queued: waiting for a free slot", "observedGeneration": 1}}))
            .respond(200, serde_json::to_value(&run).expect("json")),
    ]);
    let h = harness(client, None);
    intake_reported_pending(&h.store, &run).await;
    let action = reconcile_once(&h, &run).await;
    server.done().await;
    assert_eq!(action, Action::requeue(super::reconcile::QUEUED_RESYNC));
    assert_eq!(reported(&h.store).await, [(StatusKind::Pending, None, None)], "pending only once");
    assert!(h.started.lock().expect("lock").is_empty(), "nothing started yet");
}

/// The status the mapping gives `run` for `pr` with no TaskRuns.
fn mapped_status(run: &WorkflowRun, pr: &PipelineRun) -> WorkflowRunStatus {
    let plan = run.plan();
    super::status::map(&Observation {
        run,
        plan: &plan,
        pipeline_run: Some(pr),
        task_runs: &[],
        pods: &[],
        last_reported: Some(StatusKind::Pending),
        now: Timestamp::now(),
        fail_fast_grace: Duration::from_secs(120),
    })
    .status
}

#[tokio::test]
async fn a_new_run_first_gets_the_finalizer() {
    let mut run = run();
    run.metadata.finalizers = None;
    let (client, server) = ApiServer::new(vec![
        Exchange::patch(&format!("{RUNS}/wf?"))
            .content_type("application/json-patch+json")
            .body(json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": [super::FINALIZER]}]))
            .respond(200, ok_run()),
    ]);
    let h = harness(client, None);
    assert_eq!(
        reconcile_once(&h, &run).await,
        Action::await_change(),
        "the patch triggers the next reconcile"
    );
    server.done().await;
}

#[tokio::test]
async fn re_reconcile_only_reads() {
    let pr = created_pr();
    let run = run().with_status(mapped_status(&run(), &pr));
    let mut script = Vec::new();
    observe(&mut script, &pr, vec![]);
    let (client, server) = ApiServer::new(script);
    let h = harness(client, None);
    intake_reported_pending(&h.store, &run).await;
    reconcile_once(&h, &run).await;
    server.done().await;
    assert_eq!(reported(&h.store).await.len(), 1);
}

#[tokio::test]
async fn already_exists_is_success() {
    let run = run();
    let pr = created_pr();
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name())).fail(404, "NotFound"),
        Exchange::post(&format!("{SECRETS}?")).fail(409, "AlreadyExists"),
        Exchange::post(&format!("{PRS}?")).fail(409, "AlreadyExists"),
        Exchange::get(&format!("{PRS}/{}", pr_name())).respond(200, serde_json::to_value(&pr).expect("json")),
        Exchange::get(&format!("{TRS}{}", selector())).respond(200, list("TaskRunList", vec![])),
        Exchange::get(&format!("{PODS}{}", selector())).respond(200, list("PodList", vec![])),
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "pending", "pipelineRunName": pr_name()}}))
            .respond(200, serde_json::to_value(&run).expect("json")),
    ]);
    let h = harness(client, None);
    intake_reported_pending(&h.store, &run).await;
    reconcile_once(&h, &run).await;
    server.done().await;
}

#[tokio::test]
async fn each_transition_is_written_reported_and_announced_once() {
    let events = watch_sequence("per-step-fail");
    let mut state = ClusterState::default();
    let running_at = events
        .iter()
        .position(|e| {
            state.apply(e);
            !state.task_runs.is_empty()
                && state
                    .pipeline_run
                    .as_ref()
                    .and_then(|p| p.status.as_ref())
                    .is_some_and(|s| !s.conditions.is_empty())
        })
        .expect("a running state")
        + 1;
    let (running_pr, running_trs) = recorded(running_at);
    let (failed_pr, failed_trs) = recorded(events.len());

    let mut script = Vec::new();
    // 1. Tekton started it: running.
    observe(&mut script, &running_pr, running_trs);
    script.push(
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "running", "pipelineRunName": pr_name()}}))
            .respond(200, ok_run()),
    );
    script.push(event("Running", "Normal"));
    // 2. Step 2 exited 3: failed with the real exit code, step 3 skipped.
    observe(&mut script, &failed_pr, failed_trs);
    script.push(
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "failed", "exitCode": 3, "message": WORKFLOW_FAILED}}))
            .respond(200, ok_run()),
    );
    script.push(event("Failed", "Warning"));
    let (client, server) = ApiServer::new(script);
    let h = harness(client, None);
    let mut run = run();
    intake_reported_pending(&h.store, &run).await;

    reconcile_once(&h, &run).await;
    let plan = run.plan();
    let status = super::status::map(&Observation {
        run: &run,
        plan: &plan,
        pipeline_run: Some(&running_pr),
        task_runs: &[],
        pods: &[],
        last_reported: Some(StatusKind::Running),
        now: Timestamp::now(),
        fail_fast_grace: Duration::from_secs(120),
    })
    .status;
    run.status = Some(status);
    let action = reconcile_once(&h, &run).await;
    server.done().await;

    assert_eq!(action, Action::requeue(h.ctx.run_ttl), "finished runs wait for their TTL");
    assert_eq!(
        reported(&h.store).await,
        [
            (StatusKind::Pending, None, None),
            (StatusKind::Running, None, None),
            (StatusKind::Failed, Some(WORKFLOW_FAILED.into()), Some(3))
        ]
    );
    let started = h.started.lock().expect("lock");
    assert_eq!(started.len(), 1, "the log follower is started once");
    assert_eq!(started[0].pipeline_run, pr_name());
}

#[tokio::test]
async fn cancellation_patches_the_pipeline_run_then_reports_cancelled() {
    let run = run().cancelled().with_status(WorkflowRunStatus {
        phase: Some(StatusKind::Running),
        pipeline_run_name: Some(pr_name()),
        start_time: Some(Time(Timestamp::now())),
        ..Default::default()
    });
    let all = watch_sequence("per-step-cancel");
    let mut state = ClusterState::default();
    let mut before_cancel = None;
    for e in &all {
        state.apply(e);
        if before_cancel.is_none()
            && state.pipeline_run.as_ref().is_some_and(|p| {
                p.spec.status.is_none() && p.status.as_ref().is_some_and(|s| s.child_references.len() >= 2)
            })
        {
            before_cancel = Some(state.clone());
        }
    }
    let rename = |mut pr: PipelineRun| {
        pr.metadata.name = Some(pr_name());
        pr
    };
    let before_cancel = before_cancel.expect("a running state");
    let running = rename(before_cancel.pipeline_run.clone().expect("pr"));
    let cancelled = rename(state.pipeline_run.clone().expect("pr"));
    let children: Vec<String> = running
        .status
        .as_ref()
        .map(|s| s.child_references.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default();
    assert!(children.len() >= 2, "{children:?}");

    let mut script = vec![
        Exchange::get(&format!("{PRS}/{}", pr_name()))
            .respond(200, serde_json::to_value(&running).expect("json")),
        Exchange::patch(&format!("{PRS}/{}?", pr_name()))
            .content_type("application/merge-patch+json")
            .body(json!({"spec": {"status": "Cancelled"}}))
            .respond(200, serde_json::to_value(&running).expect("json")),
        // The label finds nothing: the TaskRuns named in childReferences are fetched one by one;
        // the first is there, the second is already gone (and simply absent).
        Exchange::get(&format!("{TRS}{}", selector())).respond(200, list("TaskRunList", vec![])),
        Exchange::get(&format!("{TRS}/{}", children[0]))
            .respond(200, serde_json::to_value(&before_cancel.task_runs[&children[0]]).expect("json")),
        Exchange::get(&format!("{TRS}/{}", children[1])).fail(404, "NotFound"),
    ];
    for child in &children[2..] {
        script.push(Exchange::get(&format!("{TRS}/{child}")).fail(404, "NotFound"));
    }
    script.extend([
        Exchange::get(&format!("{PODS}{}", selector())).respond(200, list("PodList", vec![])),
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "running", "steps": [{"name": crate::plan::CLONE_STEP_NAME}, {"name": "build"}, {"name": "boom"}, {"name": "never"}]}}))
            .respond(200, ok_run()),
    ]);
    let final_trs = state.task_runs().into_iter().map(|t| serde_json::to_value(t).expect("json")).collect();
    observe(&mut script, &cancelled, final_trs);
    script.push(
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "cancelled"}}))
            .respond(200, ok_run()),
    );
    script.push(event("Cancelled", "Normal"));
    let (client, server) = ApiServer::new(script);
    let h = harness(client, None);
    already_reported(&h.store, &run, &[StatusKind::Pending, StatusKind::Running]).await;
    reconcile_once(&h, &run).await;
    reconcile_once(&h, &run).await;
    server.done().await;
    let seen: Vec<_> = reported(&h.store).await.into_iter().map(|s| s.0).collect();
    assert_eq!(seen, [StatusKind::Pending, StatusKind::Running, StatusKind::Cancelled]);
}

#[tokio::test]
async fn deleting_an_unfinished_run_cancels_and_reports_cancelled() {
    let mut run = run().with_status(WorkflowRunStatus {
        phase: Some(StatusKind::Pending),
        pipeline_run_name: Some(pr_name()),
        ..Default::default()
    });
    run.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let pr = created_pr();
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name())).respond(200, serde_json::to_value(&pr).expect("json")),
        Exchange::patch(&format!("{PRS}/{}?", pr_name()))
            .body(json!({"spec": {"status": "Cancelled"}}))
            .respond(200, serde_json::to_value(&pr).expect("json")),
        event("Cancelled", "Normal"),
        Exchange::patch(&format!("{RUNS}/wf?"))
            .content_type("application/json-patch+json")
            .body(json!([{"op": "test", "path": "/metadata/finalizers/0", "value": super::FINALIZER},
                {"op": "remove", "path": "/metadata/finalizers/0"}]))
            .respond(200, serde_json::to_value(&run).expect("json")),
    ]);
    let h = harness(client, None);
    intake_reported_pending(&h.store, &run).await;
    reconcile_once(&h, &run).await;
    server.done().await;
    let seen: Vec<_> = reported(&h.store).await.into_iter().map(|s| s.0).collect();
    assert_eq!(seen, [StatusKind::Pending, StatusKind::Cancelled], "a queued run never ran");
}

#[tokio::test]
async fn finished_runs_are_deleted_after_their_ttl() {
    let run = run().with_status(WorkflowRunStatus {
        phase: Some(StatusKind::Success),
        start_time: Some(Time("2026-01-01T00:00:00Z".parse().expect("ts"))),
        completion_time: Some(Time("2026-01-01T00:01:00Z".parse().expect("ts"))),
        ..Default::default()
    });
    let (client, server) = ApiServer::new(vec![
        Exchange::delete(&format!("{RUNS}/wf?"))
            .body(json!({"propagationPolicy": "Background"}))
            .respond(200, serde_json::to_value(&run).expect("json")),
    ]);
    let h = harness(client, None);
    already_reported(&h.store, &run, &[StatusKind::Pending, StatusKind::Running, StatusKind::Success]).await;
    assert_eq!(reconcile_once(&h, &run).await, Action::await_change());
    server.done().await;
    assert_eq!(reported(&h.store).await.len(), 3, "nothing re-reported");

    // Not yet expired: no request at all, just a requeue for the remaining time.
    let fresh = run.clone().with_status(WorkflowRunStatus {
        phase: Some(StatusKind::Success),
        start_time: Some(Time(Timestamp::now())),
        completion_time: Some(Time(Timestamp::now())),
        ..Default::default()
    });
    let (client, server) = ApiServer::new(vec![]);
    let h2 = harness(client, None);
    already_reported(&h2.store, &run, &[StatusKind::Pending, StatusKind::Running, StatusKind::Success]).await;
    let action = reconcile_once(&h2, &fresh).await;
    server.done().await;
    assert_ne!(action, Action::await_change());
}

#[tokio::test]
async fn a_pipeline_run_deleted_behind_our_back_fails_the_run() {
    let run = run().with_status(WorkflowRunStatus {
        phase: Some(StatusKind::Running),
        pipeline_run_name: Some(pr_name()),
        start_time: Some(Time(Timestamp::now())),
        ..Default::default()
    });
    let message = format!("PipelineRun {} was deleted", pr_name());
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name())).fail(404, "NotFound"),
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "failed", "message": message, "exitCode": -1}}))
            .respond(200, ok_run()),
        event("Failed", "Warning"),
    ]);
    let h = harness(client, None);
    already_reported(&h.store, &run, &[StatusKind::Pending, StatusKind::Running]).await;
    reconcile_once(&h, &run).await;
    server.done().await;
    assert_eq!(reported(&h.store).await.last().cloned(), Some((StatusKind::Failed, Some(message), Some(-1))));
}

#[tokio::test]
async fn an_untranslatable_run_fails_once_without_retrying() {
    let mut run = run();
    run.spec.image = None;
    let error = "engine \"kubernetes\" needs an image: set spec.image";
    let (client, server) = ApiServer::new(vec![
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "failed", "message": error}}))
            .respond(200, ok_run()),
        event("Failed", "Warning"),
    ]);
    let h = harness(client, None);
    let action = reconcile_once(&h, &run).await;
    server.done().await;
    assert_eq!(action, Action::requeue(h.ctx.run_ttl), "no retry storm: only the TTL brings it back");
    assert_eq!(reported(&h.store).await, [(StatusKind::Failed, Some(error.into()), Some(-1))]);
}

#[tokio::test]
async fn a_malformed_object_is_marked_and_left_alone() {
    let broken = json!({
        "apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "broken", "namespace": NAMESPACE, "uid": "u1"},
        "spec": {"knot": 7}
    });
    let guard: DeserializeGuard<WorkflowRun> = serde_json::from_value(broken.clone()).expect("guard");
    assert!(guard.0.is_err());
    let (client, server) = ApiServer::new(vec![
        Exchange::patch(&format!("{RUNS}/broken/status?&force=true&fieldManager=bobbin"))
            .body(json!({"status": {"phase": "failed"}}))
            .respond(200, ok_run()),
    ]);
    let h = harness(client, None);
    let action = reconcile(Arc::new(guard), h.ctx.clone()).await.expect("handled");
    server.done().await;
    assert_eq!(action, Action::await_change());
    assert!(reported(&h.store).await.is_empty(), "no annotations: no workflow to report on");
}

#[tokio::test]
async fn a_malformed_intake_run_is_reported_failed_to_tangled_once() {
    let broken = json!({
        "apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "broken", "namespace": NAMESPACE, "uid": "u1", "annotations": {
            "bobbin.dev/pipeline-uri": "at://did:web:knot1.tangled.sh/sh.tangled.pipeline/3m734z2gwll22",
            "bobbin.dev/workflow": "test.yml"}},
        "spec": {"knot": 7}
    });
    let patch = || {
        Exchange::patch(&format!("{RUNS}/broken/status?&force=true&fieldManager=bobbin"))
            .body(json!({"status": {"phase": "failed"}}))
            .respond(200, ok_run())
    };
    let (client, server) = ApiServer::new(vec![patch(), patch()]);
    let h = harness(client, None);
    for _ in 0..2 {
        let guard: DeserializeGuard<WorkflowRun> = serde_json::from_value(broken.clone()).expect("guard");
        let action = reconcile(Arc::new(guard), h.ctx.clone()).await.expect("handled");
        assert_eq!(action, Action::await_change());
    }
    server.done().await;
    let statuses = reported(&h.store).await;
    assert_eq!(statuses.len(), 1, "reported once across reconciles: {statuses:?}");
    let (status, error, exit_code) = &statuses[0];
    assert_eq!((*status, *exit_code), (StatusKind::Failed, Some(-1)));
    assert!(error.as_deref().is_some_and(|e| e.starts_with("invalid WorkflowRun: ")), "{error:?}");
    let latest = h
        .store
        .latest_status(&crate::model::WorkflowId::new("knot1.tangled.sh", "3m734z2gwll22", "test.yml"))
        .await
        .expect("store")
        .expect("a status for the annotated workflow");
    assert_eq!(latest.status, StatusKind::Failed);
}

#[test]
fn backoff_is_bounded() {
    use super::reconcile::backoff;
    assert_eq!(backoff(1), Duration::from_secs(5));
    assert_eq!(backoff(3), Duration::from_secs(20));
    assert_eq!(backoff(40), super::reconcile::MAX_BACKOFF);
}

#[tokio::test]
async fn serve_refuses_to_start_without_tekton_and_stays_unready() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (client, server) = ApiServer::new(vec![Exchange::get("/apis/tekton.dev/v1").fail(404, "NotFound")]);
    let (_dir, store) = crate::store::temp_store();
    let ready = Arc::new(AtomicBool::new(false));
    let deps = super::Deps {
        client,
        config: Arc::new(crate::config::Config::for_tests()),
        namespace: NAMESPACE.into(),
        store,
        secrets: Arc::new(FixedSecrets(BTreeMap::new())),
        ready: ready.clone(),
        metrics: Arc::new(ControllerMetrics::default()),
        on_run_started: Arc::new(|_| {}),
        identity: super::default_identity(),
        while_leading: None,
    };
    let e = super::run(deps, tokio_util::sync::CancellationToken::new()).await.expect_err("no Tekton");
    server.done().await;
    assert_eq!(e.label(), "no_tekton");
    assert!(!ready.load(Ordering::SeqCst), "/readyz stays 503");
}

#[tokio::test]
async fn a_full_queue_fails_the_run_with_a_reason_instead_of_dropping_it() {
    let run = run();
    let error = "the queue is full: 100 runs are waiting (SPINDLE_SERVER_QUEUE_SIZE=100)";
    let (client, server) = ApiServer::new(vec![
        Exchange::get(&format!("{PRS}/{}", pr_name())).fail(404, "NotFound"),
        Exchange::patch(&status_path())
            .body(json!({"status": {"phase": "failed", "message": error}}))
            .respond(200, ok_run()),
        event("Failed", "Warning"),
    ]);
    let h = harness(client, None);
    for _ in 0..100 {
        h.ctx.queue.note_queued();
    }
    intake_reported_pending(&h.store, &run).await;
    reconcile_once(&h, &run).await;
    server.done().await;
    assert_eq!(
        reported(&h.store).await.last().cloned(),
        Some((StatusKind::Failed, Some(error.into()), Some(-1)))
    );
}
