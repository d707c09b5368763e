//! A knot's `sh.tangled.pipeline` event → one WorkflowRun (or one `failed` status) per workflow.
//!
//! [`plan`] is the pure part: spec §3.6 validation and the per-workflow decision of §5.1 with B5
//! fixed (a bad workflow fails alone). [`PipelineIntake::handle`] is the durable part, in this
//! order for every event:
//!
//! 1. per workflow, in array order: append its first status (`failed`, or `pending` and then
//!    create the WorkflowRun; AlreadyExists counts as created);
//! 2. in one transaction: mark (knot, rkey) taken in and advance the knot's cursor.
//!
//! A crash anywhere before step 2 leaves the cursor behind the event, so the knot replays it; the
//! replay finds each workflow's status already present (not appended again) and each WorkflowRun
//! already existing. After step 2 a replay is recognised by (knot, rkey) and skipped (B6).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::{Api, ObjectMeta, PostParams};

use super::ws::Frame;
use super::{IntakeError, Result};
use crate::crd::{TriggerSpec, WorkflowRun, WorkflowRunSpec};
use crate::model::pipeline::PIPELINE_NSID;
use crate::model::status::decode_tid;
use crate::model::{KnotEnvelope, PipelineRecord, StatusKind, StatusRecord, WorkflowId, workflow};
use crate::naming;
use crate::store::Store;

/// Exit code of every workflow rejected at intake, as Go reports it.
pub const INTAKE_EXIT_CODE: i64 = -1;

/// How far behind an event the stored knot cursor is put (spec §3.4 recommendation), so clock
/// skew between knot and spindle up to this much loses nothing.
pub const DEFAULT_CURSOR_MARGIN: Duration = Duration::from_secs(60);

/// What to do with one workflow of an accepted pipeline.
#[derive(Debug, Clone)]
pub enum WorkflowPlan {
    Run(Box<WorkflowRun>),
    /// Rejected at intake: a `failed` status with this `error` and exit code -1, nothing runs.
    Fail {
        id: WorkflowId,
        error: String,
    },
}

impl WorkflowPlan {
    pub fn id(&self) -> WorkflowId {
        match self {
            WorkflowPlan::Run(run) => run.workflow_id(),
            WorkflowPlan::Fail { id, .. } => id.clone(),
        }
    }
}

/// Validate a pipeline record from knot source `knot` and decide each workflow (spec §3.6 steps
/// 2–5 and 7, §5.1). `Err` is the reason the whole pipeline is dropped (silently, as Go does).
/// Step 6, "is the repo registered here", needs the store and is checked by the caller.
pub fn plan(
    knot: &str,
    rkey: &str,
    record: &PipelineRecord,
    namespace: &str,
) -> Result<Vec<WorkflowPlan>, String> {
    let meta = record.trigger().map_err(|e| e.to_string())?;
    let repo = meta.repo.as_ref().ok_or("no repo data found")?;
    if repo.knot != knot {
        return Err(format!("repo knot does not match event source: {:?} != {knot:?}", repo.knot));
    }
    let mut plans = Vec::with_capacity(record.workflows.len());
    for wf in record.workflows.iter().flatten() {
        let id = WorkflowId::new(knot, rkey, &wf.name);
        // Go's order: engine, then parsing `raw`, then (at run time) the trigger kind.
        let decided = workflow::parse(wf)
            .map_err(|e| e.to_string())
            .and_then(|parsed| TriggerSpec::from_metadata(meta).map(|trigger| (parsed, trigger)));
        plans.push(match decided {
            Ok((parsed, trigger)) => {
                WorkflowPlan::Run(Box::new(workflow_run(knot, rkey, trigger, parsed, namespace)))
            }
            Err(error) => WorkflowPlan::Fail { id, error },
        });
    }
    Ok(plans)
}

/// The WorkflowRun for one parsed workflow: deterministic name, labels for `kubectl -l`, and the
/// per-run Secret reference the controller fills.
pub fn workflow_run(
    knot: &str,
    rkey: &str,
    trigger: TriggerSpec,
    parsed: workflow::Workflow,
    namespace: &str,
) -> WorkflowRun {
    let mut spec = WorkflowRunSpec::new(knot, rkey, trigger, parsed);
    let name = naming::run_name(&spec.workflow_id());
    spec.secret_name = Some(naming::secret_name(&name));
    let mut annotations = BTreeMap::from([
        ("bobbin.dev/pipeline-uri".to_owned(), spec.workflow_id().pipeline_uri()),
        ("bobbin.dev/repo-did".to_owned(), spec.trigger.repo.did.clone()),
        ("bobbin.dev/repo-name".to_owned(), spec.trigger.repo.repo.clone()),
    ]);
    if let Some(sha) = spec.trigger.commit() {
        annotations.insert("bobbin.dev/commit".to_owned(), sha.to_owned());
    }
    WorkflowRun {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(&spec)),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// The labels DESIGN.md gives a run's objects (values encoded where the raw text is not a valid
/// label value; annotations carry the raw text).
pub fn labels(spec: &WorkflowRunSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "bobbin".to_owned()),
        ("bobbin.dev/knot".to_owned(), naming::encoded_label_value(&spec.knot)),
        ("bobbin.dev/repo-did".to_owned(), naming::encoded_label_value(&spec.trigger.repo.did)),
        ("bobbin.dev/repo".to_owned(), naming::encoded_label_value(&spec.trigger.repo.repo)),
        ("bobbin.dev/pipeline".to_owned(), naming::encoded_label_value(&spec.pipeline_rkey)),
        ("bobbin.dev/workflow".to_owned(), naming::encoded_label_value(&spec.workflow)),
        ("bobbin.dev/trigger".to_owned(), spec.trigger.kind.as_str().to_owned()),
    ])
}

/// Result of asking the API server for a WorkflowRun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// Creating twice is a no-op: a replayed event finds its run.
    AlreadyExisted,
}

/// Why a WorkflowRun was not created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateError {
    /// The API server refuses this object for good (invalid, too large): the workflow fails.
    Rejected(String),
    /// Anything else (network, 5xx, RBAC or CRD not installed yet): retried, the event waits.
    Unavailable(String),
}

/// Creates WorkflowRuns; `kube::Api<WorkflowRun>` in production.
pub trait RunCreator: Send + Sync {
    fn create<'a>(&'a self, run: &'a WorkflowRun) -> BoxFuture<'a, Result<Created, CreateError>>;
}

impl RunCreator for Api<WorkflowRun> {
    fn create<'a>(&'a self, run: &'a WorkflowRun) -> BoxFuture<'a, Result<Created, CreateError>> {
        Box::pin(async move {
            match Api::create(self, &PostParams::default(), run).await {
                Ok(_) => Ok(Created::New),
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(Created::AlreadyExisted),
                Err(kube::Error::Api(status)) if matches!(status.code, 400 | 413 | 422) => {
                    Err(CreateError::Rejected(format!("{} ({})", status.message, status.reason)))
                }
                Err(e) => Err(CreateError::Unavailable(e.to_string())),
            }
        })
    }
}

/// What happened to one knot frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Not JSON or not an envelope: logged and skipped (B11).
    Malformed(String),
    /// Another nsid (e.g. `sh.tangled.git.refUpdate`).
    Ignored(String),
    /// Already taken in (a replay).
    Duplicate,
    /// Dropped by validation (spec §3.6), silently to the outside.
    Dropped(String),
    /// Taken in: the WorkflowRuns created and the workflows failed at intake.
    Accepted { runs: Vec<String>, failed: Vec<(String, String)> },
}

/// Points where a test can make intake "crash" (return an error and be dropped); no-ops otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// After the n-th (0-based) workflow's first status was appended.
    AfterStatus(usize),
    /// After the n-th workflow's WorkflowRun was created.
    AfterCreate(usize),
    /// After all workflows, before marking the pipeline taken in.
    BeforeMark,
}

/// Takes knot frames in durably. One instance serves every knot; calls for one knot must be
/// sequential (the knot consumer guarantees it) so that its cursor only covers handled frames.
pub struct PipelineIntake {
    store: Store,
    runs: Arc<dyn RunCreator>,
    namespace: String,
    server_owner: String,
    cursor_margin: Duration,
    #[cfg(test)]
    crash: Option<CrashPoint>,
}

impl PipelineIntake {
    /// `namespace` is where WorkflowRuns go; `server_owner` is `SPINDLE_SERVER_OWNER` (repos whose
    /// owner is neither it nor a member take no new pipelines).
    pub fn new(
        store: Store,
        runs: Arc<dyn RunCreator>,
        namespace: impl Into<String>,
        server_owner: impl Into<String>,
    ) -> Self {
        PipelineIntake {
            store,
            runs,
            namespace: namespace.into(),
            server_owner: server_owner.into(),
            cursor_margin: DEFAULT_CURSOR_MARGIN,
            #[cfg(test)]
            crash: None,
        }
    }

    pub fn with_cursor_margin(mut self, margin: Duration) -> Self {
        self.cursor_margin = margin;
        self
    }

    #[cfg(test)]
    pub(crate) fn crash_at(mut self, point: CrashPoint) -> Self {
        self.crash = Some(point);
        self
    }

    fn checkpoint(&self, point: CrashPoint) -> Result<()> {
        #[cfg(test)]
        if self.crash == Some(point) {
            return Err(IntakeError::Kube {
                name: "-".into(),
                message: format!("injected crash at {point:?}"),
            });
        }
        let _ = point;
        Ok(())
    }

    /// The cursor to store once `frame` is handled: its receive time minus the margin (spec §3.4),
    /// but never later than the event's own TID time minus the margin. The TID comes from the
    /// knot's clock and precedes the event's `created`, so a backlog replayed long after it was
    /// written cannot push the cursor past events still queued behind it.
    pub fn cursor_for(&self, frame: &Frame, rkey: Option<&str>) -> i64 {
        let margin = self.cursor_margin.as_nanos() as i64;
        let by_receipt = frame.received_ns - margin;
        let by_tid =
            rkey.and_then(decode_tid).map(|(micros, _)| (micros as i64).saturating_mul(1000) - margin);
        by_tid.map_or(by_receipt, |t| t.min(by_receipt)).max(0)
    }

    /// Handle one frame from knot source `knot`. `Err` means nothing was marked: retry the same
    /// frame later (it is idempotent).
    pub async fn handle(&self, knot: &str, frame: &Frame) -> Result<Handled> {
        let envelope = match KnotEnvelope::parse(&frame.text) {
            Ok(e) => e,
            Err(e) => {
                self.store.advance_knot_cursor(knot, self.cursor_for(frame, None)).await?;
                return Ok(Handled::Malformed(e.to_string()));
            }
        };
        let cursor = self.cursor_for(frame, Some(&envelope.rkey));
        if envelope.nsid != PIPELINE_NSID {
            self.store.advance_knot_cursor(knot, cursor).await?;
            return Ok(Handled::Ignored(envelope.nsid));
        }
        if self.store.pipeline_seen(knot, &envelope.rkey).await? {
            self.store.advance_knot_cursor(knot, cursor).await?;
            return Ok(Handled::Duplicate);
        }
        let drop = |reason: String| async move {
            self.store.advance_knot_cursor(knot, cursor).await?;
            Ok(Handled::Dropped(reason))
        };
        let record = match envelope.pipeline() {
            Ok(r) => r,
            Err(e) => return drop(e.to_string()).await,
        };
        let plans = match plan(knot, &envelope.rkey, &record, &self.namespace) {
            Ok(p) => p,
            Err(reason) => return drop(reason).await,
        };
        if let Some(repo) = record.trigger_metadata.as_ref().and_then(|t| t.repo.as_ref())
            && !self.store.repo_accepts_pipelines(knot, &repo.did, &repo.repo, &self.server_owner).await?
        {
            return drop(format!(
                "repo {}/{} on {knot} is not registered here, or its owner is no longer a member",
                repo.did, repo.repo
            ))
            .await;
        }

        let (mut runs, mut failed) = (Vec::new(), Vec::new());
        for (i, plan) in plans.into_iter().enumerate() {
            let id = plan.id();
            let now = jiff::Timestamp::now();
            match plan {
                WorkflowPlan::Fail { error, .. } => {
                    let status =
                        StatusRecord::new(&id, StatusKind::Failed, now).with_error(&error, INTAKE_EXIT_CODE);
                    self.store.append_first_status(status).await?;
                    self.checkpoint(CrashPoint::AfterStatus(i))?;
                    failed.push((id.name, error));
                }
                WorkflowPlan::Run(run) => {
                    // `pending` goes first, so the controller can never report `running` before it.
                    self.store.append_first_status(StatusRecord::new(&id, StatusKind::Pending, now)).await?;
                    self.checkpoint(CrashPoint::AfterStatus(i))?;
                    let name = run.metadata.name.clone().unwrap_or_default();
                    match self.runs.create(&run).await {
                        Ok(created) => {
                            tracing::info!(run = %name, workflow = %id, ?created, "workflow run requested");
                            runs.push(name);
                        }
                        Err(CreateError::Rejected(message)) => {
                            let error = format!("cannot create WorkflowRun: {message}");
                            let status = StatusRecord::new(&id, StatusKind::Failed, jiff::Timestamp::now())
                                .with_error(&error, INTAKE_EXIT_CODE);
                            self.store.append_transition(status).await?;
                            failed.push((id.name, error));
                        }
                        Err(CreateError::Unavailable(message)) => {
                            return Err(IntakeError::Kube { name, message });
                        }
                    }
                    self.checkpoint(CrashPoint::AfterCreate(i))?;
                }
            }
        }
        self.checkpoint(CrashPoint::BeforeMark)?;
        self.store.mark_pipeline(knot, &envelope.rkey, cursor).await?;
        Ok(Handled::Accepted { runs, failed })
    }
}
