//! Reconcile one WorkflowRun: a pipeline where only the edges do IO.
//!
//! fetch the PipelineRun → (if missing) plan and translate, pure → ensure the per-run Secret and
//! create the PipelineRun held in the queue → fetch its TaskRuns and Pods → map the status, pure →
//! write `WorkflowRun.status` by server-side apply → append the tangled statuses, each exactly once
//! → Kubernetes Events for the transitions that were new.
//!
//! The finalizer is the single top-level action: deleting an unfinished run cancels its
//! PipelineRun and reports `cancelled` before the object goes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::cleanup::{self, Ttl};
use super::metrics::ControllerMetrics;
use super::queue::{QUEUED_AT, QueueKick};
use super::status::{self, Mapped, Observation, Verdict};
use super::{FINALIZER, RUN_LABEL};
use crate::crd::{FIELD_MANAGER, WorkflowRun, WorkflowRunStatus};
use crate::model::ids::parse_pipeline_uri;
use crate::model::{StatusKind, StatusRecord, WorkflowId};
use crate::plan::{self, Plan};
use crate::secrets::{self, SecretValues, SecretsError};
use crate::store::{Store, StoreError};
use crate::tekton::secret::per_run_secret;
use crate::tekton::translate::{self, TranslateInput, TranslateSettings, keys};
use crate::tekton::types::{LABEL_PIPELINE_RUN, spec_status, succeeded};
use crate::tekton::{PipelineRun, TaskRun};

/// How often a run still in flight is looked at without a watch event (pods are not watched).
pub const RUNNING_RESYNC: Duration = Duration::from_secs(30);
/// The same for a run still waiting in the queue: only its PipelineRun can change, and that is
/// watched.
pub const QUEUED_RESYNC: Duration = Duration::from_secs(300);
/// Longest wait between retries of a failing reconcile.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Why a reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("reading the secrets of {scope}: {source}")]
    Secrets { scope: String, source: SecretsError },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the WorkflowRun has no {0}")]
    Incomplete(&'static str),
}

impl Error {
    /// Stable label for metrics and Events.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Store(e) => e.label(),
            Error::Secrets { .. } => "secrets",
            Error::Finalizer(_) => "finalizer",
            Error::Incomplete(_) => "incomplete",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A run whose steps started: what the log follower needs to attach to it
/// (`logs::RunTarget::new(&s.run, &s.plan, &s.pipeline_run, &s.namespace)`). `run.spec.secretName`
/// is always set to the per-run Secret's name, so the follower can mask its values.
#[derive(Debug, Clone)]
pub struct StartedRun {
    pub run: WorkflowRun,
    pub plan: Plan,
    pub namespace: String,
    pub pipeline_run: String,
}

/// Called (once per process and run) when a run's steps start, or when bobbin finds a run that
/// started before it did; it must not block.
pub type RunHook = Arc<dyn Fn(StartedRun) + Send + Sync>;

/// Everything a reconcile needs; shared by all of them.
pub struct Context {
    pub client: Client,
    pub namespace: String,
    pub settings: TranslateSettings,
    pub run_ttl: Duration,
    pub fail_fast_grace: Duration,
    /// Most runs that may wait for a slot (`SPINDLE_SERVER_QUEUE_SIZE`).
    pub queue_size: usize,
    pub store: Store,
    pub secrets: Arc<dyn SecretValues>,
    pub recorder: Recorder,
    pub queue: QueueKick,
    pub metrics: Arc<ControllerMetrics>,
    pub on_run_started: RunHook,
    announced: Mutex<HashSet<String>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        namespace: String,
        config: &crate::config::Config,
        store: Store,
        secrets: Arc<dyn SecretValues>,
        queue: QueueKick,
        metrics: Arc<ControllerMetrics>,
        on_run_started: RunHook,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), "bobbin".into());
        Context {
            recorder,
            namespace,
            settings: TranslateSettings::from(config),
            run_ttl: config.run_ttl,
            queue_size: config.queue_size,
            fail_fast_grace: config.fail_fast_grace,
            store,
            secrets,
            queue,
            metrics,
            on_run_started,
            client,
            announced: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    fn runs(&self) -> Api<WorkflowRun> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
    fn pipeline_runs(&self) -> Api<PipelineRun> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// The controller's reconcile function.
#[tracing::instrument(skip_all, fields(run = %guard.name_any()))]
pub async fn reconcile(guard: Arc<DeserializeGuard<WorkflowRun>>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = match &guard.0 {
        Ok(run) => {
            let api = ctx.runs();
            finalizer(&api, FINALIZER, Arc::new(run.clone()), |event| async {
                match event {
                    Finalizer::Apply(run) => apply(&run, &ctx).await,
                    Finalizer::Cleanup(run) => deleted(&run, &ctx).await,
                }
            })
            .await
            .map_err(|e| Error::Finalizer(Box::new(e)))
        }
        Err(invalid) => {
            // Not a WorkflowRun this build can read: say so on the object, then wait for an edit.
            tracing::warn!(error = %invalid.error, "malformed WorkflowRun");
            ctx.metrics.error("malformed");
            let message = format!("invalid WorkflowRun: {}", invalid.error);
            if let Some(name) = &invalid.metadata.name {
                let status = json!({"apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun", "status": {
                    "phase": "failed", "message": message}});
                // Through the guard again: the answer is the same malformed object.
                Api::<DeserializeGuard<WorkflowRun>>::namespaced(ctx.client.clone(), &ctx.namespace)
                    .patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&status))
                    .await?;
            }
            // Tell tangled too, so the workflow does not stay `pending` there forever; the id comes
            // from the annotations intake writes, as the spec that holds it cannot be read.
            if let Some(id) = workflow_id_from_annotations(&invalid.metadata) {
                let last = ctx.store.latest_status(&id).await?.map(|r| r.status);
                if !last.is_some_and(StatusKind::is_final) {
                    let record =
                        StatusRecord::new(&id, StatusKind::Failed, Timestamp::now()).with_error(message, -1);
                    ctx.store.append_transition(record).await?;
                }
            }
            Ok(Action::await_change())
        }
    };
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    if result.is_ok()
        && let Some(uid) = guard.meta().uid.as_deref()
    {
        ctx.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
    }
    result
}

/// The workflow a WorkflowRun reports as, from the `bobbin.dev/pipeline-uri` and
/// `bobbin.dev/workflow` annotations (set on every run intake creates).
fn workflow_id_from_annotations(meta: &kube::api::ObjectMeta) -> Option<WorkflowId> {
    let annotations = meta.annotations.as_ref()?;
    let (knot, rkey) = parse_pipeline_uri(annotations.get(keys::PIPELINE_URI)?)?;
    Some(WorkflowId::new(knot, rkey, annotations.get(keys::WORKFLOW)?))
}

/// Retry a failed reconcile with bounded exponential backoff (5 s, 10 s, … 5 min) per object.
pub fn error_policy(guard: Arc<DeserializeGuard<WorkflowRun>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.label());
    let uid = guard.meta().uid.clone().unwrap_or_else(|| guard.name_any());
    let mut failures = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
    let n = failures.entry(uid).or_insert(0);
    *n = n.saturating_add(1);
    let delay = backoff(*n);
    tracing::warn!(error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// 5 s doubled per consecutive failure, at most [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(16));
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

fn name_of(run: &WorkflowRun) -> Result<String> {
    run.metadata.name.clone().ok_or(Error::Incomplete("name"))
}

fn is_done(pr: &PipelineRun) -> bool {
    pr.status
        .as_ref()
        .and_then(|s| succeeded(&s.conditions))
        .is_some_and(|c| c.status == "True" || c.status == "False")
}

async fn apply(run: &WorkflowRun, ctx: &Context) -> Result<Action> {
    let name = name_of(run)?;
    let now = Timestamp::now();
    let last = ctx.store.latest_status(&run.workflow_id()).await?.map(|r| r.status);

    if run.status.as_ref().and_then(|s| s.phase).is_some_and(|p| p.is_final()) {
        // Settled: make sure tangled heard it, then wait for the TTL.
        let mapped = status::conclude(run, Verdict::new(run.phase()), last, now);
        report(run, &mapped.records, ctx).await?;
        return match cleanup::ttl_state(run, ctx.run_ttl, now) {
            Ttl::Expired => {
                tracing::info!("TTL expired; deleting the run and everything it owns");
                cleanup::delete_run(&ctx.runs(), &name).await?;
                Ok(Action::await_change())
            }
            Ttl::After(d) => Ok(Action::requeue(d)),
            Ttl::NotFinished => Ok(Action::await_change()),
        };
    }

    let plan = match plan::plan(&run.spec, &ctx.settings.plan) {
        Ok(plan) => plan,
        Err(e) => return conclude(run, Verdict::failed(e.to_string(), -1), last, ctx).await,
    };
    let pr_api = ctx.pipeline_runs();
    let pr_name = translate::pipeline_run_name(run);
    let pr = match pr_api.get_opt(&pr_name).await? {
        Some(pr) => pr,
        None => {
            if let Some(gone) = run.status.as_ref().and_then(|s| s.pipeline_run_name.as_deref()) {
                let verdict = Verdict::failed(format!("PipelineRun {gone} was deleted"), -1);
                return conclude(run, verdict, last, ctx).await;
            }
            if run.spec.cancel {
                return conclude(run, Verdict::new(StatusKind::Cancelled), last, ctx).await;
            }
            match create(run, ctx).await? {
                Ok(pr) => pr,
                Err(verdict) => return conclude(run, verdict, last, ctx).await,
            }
        }
    };

    let owner = pr.owner_references().iter().find(|o| o.controller == Some(true)).map(|o| o.uid.as_str());
    if owner.is_some() && owner != run.metadata.uid.as_deref() {
        // Another WorkflowRun with the same workflow id owns it: never steer someone else's run.
        let verdict = Verdict::failed(format!("PipelineRun {pr_name} belongs to another WorkflowRun"), -1);
        return conclude(run, verdict, last, ctx).await;
    }
    if run.spec.cancel && !is_done(&pr) && pr.spec.status.as_deref() != Some(spec_status::CANCELLED) {
        cancel(&pr_api, &pr_name).await?;
    }

    let selector = format!("{LABEL_PIPELINE_RUN}={pr_name}");
    let task_runs = task_runs_of(&pr, &selector, ctx).await?;
    let pods: Vec<Pod> = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.namespace)
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let mapped = status::map(&Observation {
        run,
        plan: &plan,
        pipeline_run: Some(&pr),
        task_runs: &task_runs,
        pods: &pods,
        last_reported: last,
        now,
        fail_fast_grace: ctx.fail_fast_grace,
    });
    if mapped.cancel_pipeline_run && !is_done(&pr) {
        cancel(&pr_api, &pr_name).await?;
    }
    settle(run, &plan, &pr_name, mapped, ctx).await
}

/// The PipelineRun's TaskRuns: those labelled for it, plus any its `childReferences` name that the
/// label missed (never the long-removed `status.taskRuns`). One that vanished is simply absent.
async fn task_runs_of(pr: &PipelineRun, selector: &str, ctx: &Context) -> Result<Vec<TaskRun>> {
    let api = Api::<TaskRun>::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut task_runs = api.list(&ListParams::default().labels(selector)).await?.items;
    let children = pr.status.as_ref().map(|s| s.child_references.as_slice()).unwrap_or_default();
    for child in children.iter().filter(|c| c.kind.is_empty() || c.kind == "TaskRun") {
        if task_runs.iter().any(|t| t.metadata.name.as_deref() == Some(child.name.as_str())) {
            continue;
        }
        if let Some(tr) = api.get_opt(&child.name).await? {
            task_runs.push(tr);
        }
    }
    Ok(task_runs)
}

/// Write the mapped status, report it, and decide when to look again.
async fn settle(
    run: &WorkflowRun,
    plan: &Plan,
    pr_name: &str,
    mapped: Mapped,
    ctx: &Context,
) -> Result<Action> {
    write_status(run, &mapped.status, ctx).await?;
    report(run, &mapped.records, ctx).await?;
    let phase = mapped.status.phase.unwrap_or(StatusKind::Pending);
    if mapped.status.start_time.is_some() {
        announce(run, plan, pr_name, ctx);
    }
    if phase.is_final() {
        ctx.queue.kick();
        let took = match (&mapped.status.start_time, &mapped.status.completion_time) {
            (Some(a), Some(b)) => Some(b.0.duration_since(a.0).unsigned_abs()),
            _ => None,
        };
        ctx.metrics.finished(phase, took);
        if let Some(uid) = run.metadata.uid.as_deref() {
            ctx.announced.lock().unwrap_or_else(|p| p.into_inner()).remove(uid);
        }
        return Ok(Action::requeue(ctx.run_ttl));
    }
    let resync = if mapped.status.start_time.is_some() { RUNNING_RESYNC } else { QUEUED_RESYNC };
    Ok(Action::requeue(mapped.recheck_after.map_or(resync, |d| d.min(resync))))
}

/// A final status decided without Tekton: write it and report it.
async fn conclude(
    run: &WorkflowRun,
    verdict: Verdict,
    last: Option<StatusKind>,
    ctx: &Context,
) -> Result<Action> {
    if let Some(error) = &verdict.error {
        tracing::info!(%error, "run ends without a PipelineRun");
    }
    let mapped = status::conclude(run, verdict, last, Timestamp::now());
    write_status(run, &mapped.status, ctx).await?;
    report(run, &mapped.records, ctx).await?;
    if mapped.status.phase.is_some_and(|p| p.is_final()) {
        ctx.metrics.finished(mapped.status.phase.unwrap_or(StatusKind::Failed), None);
        return Ok(Action::requeue(ctx.run_ttl));
    }
    Ok(Action::await_change())
}

/// Create the per-run Secret and the PipelineRun (held in the queue). `Ok(Err(verdict))` when
/// the run cannot be translated: that is the run's outcome, not a reason to retry.
async fn create(run: &WorkflowRun, ctx: &Context) -> Result<Result<PipelineRun, Verdict>> {
    let waiting = ctx.queue.queued();
    if waiting >= ctx.queue_size {
        return Ok(Err(Verdict::failed(
            format!(
                "the queue is full: {waiting} runs are waiting (SPINDLE_SERVER_QUEUE_SIZE={})",
                ctx.queue_size
            ),
            -1,
        )));
    }
    let repo = &run.spec.trigger.repo;
    let scope = secrets::scope(&repo.did, &repo.repo);
    let values =
        ctx.secrets.values(&scope).await.map_err(|source| Error::Secrets { scope: scope.clone(), source })?;
    let keys: Vec<String> = values.keys().cloned().collect();
    let input = TranslateInput { run, secret_keys: &keys, queued: true };
    let mut desired = match translate::translate(&input, &ctx.settings) {
        Ok(pr) => pr,
        Err(e) => return Ok(Err(Verdict::failed(e.to_string(), -1))),
    };
    let name = name_of(run)?;
    desired.metadata.namespace = Some(ctx.namespace.clone());
    desired.metadata.labels.get_or_insert_with(Default::default).insert(RUN_LABEL.into(), name);
    if let Some(created) = &run.metadata.creation_timestamp {
        desired
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(QUEUED_AT.into(), created.0.to_string());
    }

    if !values.is_empty() {
        let mut secret: Secret = per_run_secret(run, &values);
        secret.metadata.namespace = Some(ctx.namespace.clone());
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            // Ours from an earlier attempt: the run keeps the values it started with.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }

    let api = ctx.pipeline_runs();
    let pr = match api.create(&PostParams::default(), &desired).await {
        Ok(pr) => pr,
        // Ours (the name is derived from the workflow id): creating twice is a no-op.
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(&desired.name_any()).await?,
        Err(e) => return Err(e.into()),
    };
    tracing::info!(pipeline_run = %pr.name_any(), "created PipelineRun (queued)");
    ctx.queue.note_queued();
    ctx.queue.kick();
    Ok(Ok(pr))
}

async fn cancel(api: &Api<PipelineRun>, name: &str) -> Result<()> {
    let patch = json!({"spec": {"status": spec_status::CANCELLED}});
    match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            tracing::info!(pipeline_run = %name, "cancelled PipelineRun");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side apply of `status` on `/status` (field manager `bobbin`), skipped when unchanged.
async fn write_status(run: &WorkflowRun, status: &WorkflowRunStatus, ctx: &Context) -> Result<()> {
    if run.status.as_ref() == Some(status) {
        return Ok(());
    }
    let name = name_of(run)?;
    let body = json!({"apiVersion": "bobbin.dev/v1alpha1", "kind": "WorkflowRun", "status": status});
    ctx.runs().patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
    Ok(())
}

/// Append each record exactly once (in order) and publish an Event for each one that was new.
async fn report(run: &WorkflowRun, records: &[StatusRecord], ctx: &Context) -> Result<()> {
    for record in records {
        if ctx.store.append_transition(record.clone()).await?.is_none() {
            continue;
        }
        let (type_, reason) = match record.status {
            StatusKind::Pending => (EventType::Normal, "Pending"),
            StatusKind::Running => (EventType::Normal, "Running"),
            StatusKind::Success => (EventType::Normal, "Succeeded"),
            StatusKind::Failed => (EventType::Warning, "Failed"),
            StatusKind::Timeout => (EventType::Warning, "TimedOut"),
            StatusKind::Cancelled => (EventType::Normal, "Cancelled"),
        };
        let note = match (&record.error, record.exit_code) {
            (Some(e), Some(code)) => format!("workflow {}: {e} (exit code {code})", record.status),
            (Some(e), None) => format!("workflow {}: {e}", record.status),
            _ => format!("workflow {}", record.status),
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Report".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
            // The status is recorded; a lost Event must not make the next attempt skip it silently.
            tracing::warn!(error = %e, "could not publish Event");
        }
    }
    Ok(())
}

fn announce(run: &WorkflowRun, plan: &Plan, pr_name: &str, ctx: &Context) {
    let Some(uid) = run.metadata.uid.clone() else { return };
    let new = ctx.announced.lock().unwrap_or_else(|p| p.into_inner()).insert(uid);
    if new {
        // The follower masks the values of the per-run Secret; name it even when intake did not.
        let mut run = run.clone();
        run.spec.secret_name = Some(translate::secret_name(&run));
        (ctx.on_run_started)(StartedRun {
            run,
            plan: plan.clone(),
            namespace: ctx.namespace.clone(),
            pipeline_run: pr_name.to_owned(),
        });
    }
}

/// The run is being deleted: an unfinished one is cancelled and reported `cancelled`.
async fn deleted(run: &WorkflowRun, ctx: &Context) -> Result<Action> {
    if run.phase().is_final() {
        return Ok(Action::await_change());
    }
    let pr_name = translate::pipeline_run_name(run);
    let api = ctx.pipeline_runs();
    if let Some(pr) = api.get_opt(&pr_name).await?
        && !is_done(&pr)
    {
        cancel(&api, &pr_name).await?;
    }
    let last = ctx.store.latest_status(&run.workflow_id()).await?.map(|r| r.status);
    let mapped = status::conclude(run, Verdict::new(StatusKind::Cancelled), last, Timestamp::now());
    report(run, &mapped.records, ctx).await?;
    ctx.queue.kick();
    Ok(Action::await_change())
}
