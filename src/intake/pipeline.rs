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

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::{Api, PostParams};

use super::ws::Frame;
use super::{IntakeError, IntakeMetrics, Result};
use crate::crd::{TriggerSpec, WorkflowRun, WorkflowRunSpec};
use crate::model::pipeline::PIPELINE_NSID;
use crate::model::status::decode_tid;
use crate::model::{KnotEnvelope, PipelineRecord, StatusKind, StatusRecord, WorkflowId, workflow};
use crate::naming;
use crate::store::Store;
use crate::tekton::translate;

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

/// The WorkflowRun for one parsed workflow: deterministic name, the same labels and annotations
/// as its PipelineRun (`kubectl get wfr,pr -l bobbin.dev/pipeline=…`), and the per-run Secret
/// reference the controller fills.
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
    let mut run = WorkflowRun::new(&name, spec);
    run.metadata.namespace = Some(namespace.to_owned());
    run.metadata.labels = Some(translate::labels(&run));
    run.metadata.annotations = Some(translate::annotations(&run));
    run
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

impl Handled {
    /// A short stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Handled::Malformed(_) => "malformed",
            Handled::Ignored(_) => "ignored",
            Handled::Duplicate => "duplicate",
            Handled::Dropped(_) => "dropped",
            Handled::Accepted { .. } => "accepted",
        }
    }
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
    metrics: IntakeMetrics,
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
            metrics: IntakeMetrics::default(),
            #[cfg(test)]
            crash: None,
        }
    }

    pub fn with_metrics(mut self, metrics: IntakeMetrics) -> Self {
        self.metrics = metrics;
        self
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

    /// The cursor to store once the frame with key `rkey` is handled: its receive time minus the
    /// margin (spec §3.4), but never later than the event's own TID time minus the margin. The TID
    /// comes from the knot's clock and precedes the event's `created`, so a backlog replayed long
    /// after it was written cannot push the cursor past events still queued behind it.
    pub fn cursor_for(&self, frame: &Frame, rkey: &str) -> i64 {
        let margin = self.cursor_margin.as_nanos() as i64;
        let by_receipt = frame.received_ns - margin;
        let by_tid = decode_tid(rkey).map(|(micros, _)| (micros as i64).saturating_mul(1000) - margin);
        by_tid.map_or(by_receipt, |t| t.min(by_receipt)).max(0)
    }

    /// Handle one frame from knot source `knot`. `Err` means nothing was marked: retry the same
    /// frame later (it is idempotent).
    pub async fn handle(&self, knot: &str, frame: &Frame) -> Result<Handled> {
        let handled = self.handle_inner(knot, frame).await?;
        self.metrics.frame("knot", handled.label());
        if let Handled::Accepted { runs, failed } = &handled {
            for _ in runs {
                self.metrics.workflow("created");
            }
            for _ in failed {
                self.metrics.workflow("failed");
            }
        }
        Ok(handled)
    }

    async fn handle_inner(&self, knot: &str, frame: &Frame) -> Result<Handled> {
        let envelope = match KnotEnvelope::parse(&frame.text) {
            Ok(e) => e,
            // Without an rkey there is no safe cursor to store; the next good frame moves it.
            Err(e) => return Ok(Handled::Malformed(e.to_string())),
        };
        let cursor = self.cursor_for(frame, &envelope.rkey);
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
        // A pipeline intake already started (statuses exist from an attempt that crashed or
        // hit an API outage) is finished whatever happened to the repo since, so none of its
        // workflows is left `pending` forever.
        if let Some(repo) = record.trigger_metadata.as_ref().and_then(|t| t.repo.as_ref())
            && !self.store.repo_accepts_pipelines(knot, &repo.did, &repo.repo, &self.server_owner).await?
            && !self
                .store
                .pipeline_has_statuses(&crate::model::ids::pipeline_uri(knot, &envelope.rkey))
                .await?
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::testkit::{MockKube, fixture};
    use crate::model::StatusFrame;
    use crate::store::intake::{self as q, RepoRow};

    const OWNER: &str = "did:plc:hbrpoigf3cbfnobm2o4rak3v";
    const MEMBER: &str = "did:plc:rjnvgfygwwqc5hyfsxmecosf";
    const KNOT: &str = "knot1.tangled.sh";
    const NS: &str = "ci";

    fn push_frame() -> Frame {
        Frame { text: fixture("knot-events/pipeline-push.frame.txt"), received_ns: ws_now() }
    }

    fn pr_frame() -> Frame {
        Frame { text: fixture("knot-events/pipeline-pull-request.frame.txt"), received_ns: ws_now() }
    }

    fn ws_now() -> i64 {
        crate::intake::ws::now_ns()
    }

    /// A push envelope for our repo with the given workflows (name, engine, raw) and trigger kind.
    fn envelope(rkey: &str, kind: &str, workflows: serde_json::Value) -> Frame {
        let mut trigger = serde_json::json!({
            "kind": kind,
            "repo": {"defaultBranch": "", "did": MEMBER, "knot": KNOT, "repo": "hello-spindle"},
        });
        match kind {
            "push" => {
                trigger["push"] = serde_json::json!({"ref": "refs/heads/main", "newSha": "356a192b7913b04c54574d18c28d46e6395428ab", "oldSha": "0000000000000000000000000000000000000000"})
            }
            "manual" => trigger["manual"] = serde_json::json!({}),
            _ => {}
        }
        let text = serde_json::json!({"event": {"$type": "", "triggerMetadata": trigger, "workflows": workflows}, "nsid": PIPELINE_NSID, "rkey": rkey}).to_string();
        Frame { text, received_ns: ws_now() }
    }

    fn wf(name: &str, engine: &str, raw: &str) -> serde_json::Value {
        serde_json::json!({"clone": {"depth": 0, "skip": false, "submodules": false}, "engine": engine, "name": name, "raw": raw})
    }

    const GOOD: &str = "image: alpine:3\nsteps:\n  - name: hi\n    command: echo hi\n";

    /// The member's repo the fixture pipelines belong to.
    fn hello_spindle() -> RepoRow {
        RepoRow {
            knot: KNOT.into(),
            owner: MEMBER.into(),
            name: "hello-spindle".into(),
            rkey: "3m6pd65mx7k2b".into(),
        }
    }

    async fn registered_store(path: &std::path::Path) -> Store {
        let store = Store::open(path).expect("open");
        store
            .transaction(|tx| {
                q::put_member(tx, OWNER, "m1", "spindle.example.com", MEMBER)?;
                q::register_repo(tx, &hello_spindle())
            })
            .await
            .expect("register");
        store
    }

    fn intake(store: &Store, kube: &MockKube) -> PipelineIntake {
        PipelineIntake::new(store.clone(), Arc::new(kube.api(NS)), NS, OWNER)
    }

    async fn statuses(store: &Store) -> Vec<(String, String, StatusKind, Option<String>, Option<i64>)> {
        store
            .events_after(0, 1000)
            .await
            .expect("events")
            .into_iter()
            .map(|e| {
                let f: StatusFrame = serde_json::from_str(&e.frame).expect("frame");
                (f.event.pipeline, f.event.workflow, f.event.status, f.event.error, f.event.exit_code)
            })
            .collect()
    }

    #[test]
    fn plans_every_fixture_workflow_with_names_labels_and_secret() {
        for (file, n, commit) in [
            ("pipeline-push.json", 2, "356a192b7913b04c54574d18c28d46e6395428ab"),
            ("pipeline-pull-request.json", 2, "da4b9237bacccdf19c0760cab7aec4a8359010b0"),
        ] {
            let env = KnotEnvelope::parse(&fixture(&format!("knot-events/{file}"))).expect("env");
            let plans = plan(KNOT, &env.rkey, &env.pipeline().expect("record"), NS).expect("accepted");
            assert_eq!(plans.len(), n);
            for p in plans {
                let WorkflowPlan::Run(run) = p else { panic!("{file}: every fixture workflow runs") };
                let name = run.metadata.name.clone().expect("name");
                assert_eq!(name, naming::run_name(&run.workflow_id()));
                assert_eq!(run.spec.secret_name.as_deref(), Some(naming::secret_name(&name).as_str()));
                assert_eq!(run.metadata.namespace.as_deref(), Some(NS));
                let labels = run.metadata.labels.clone().expect("labels");
                assert_eq!(labels, translate::labels(&run), "labelled like its PipelineRun");
                assert_eq!(labels["bobbin.dev/knot"], KNOT);
                assert_eq!(labels["bobbin.dev/pipeline"], env.rkey);
                assert_eq!(labels["app.kubernetes.io/managed-by"], "bobbin");
                assert!(labels.values().all(|v| naming::label_value(v).is_some()), "{labels:?}");
                let ann = run.metadata.annotations.clone().expect("annotations");
                assert_eq!(ann["bobbin.dev/commit"], commit);
                assert_eq!(ann["bobbin.dev/repo-did"], MEMBER);
            }
        }
    }

    #[test]
    fn bad_workflows_fail_alone_b5_and_bad_pipelines_drop() {
        let frame = envelope(
            "3m7aaaaaaaa22",
            "push",
            serde_json::json!([
                wf("a.yml", "podman", GOOD),
                null,
                wf("b.yml", "kubernetes", "steps: [\n"),
                wf("c.yml", "kubernetes", "steps:\n  - name: x\n    command: y\n"),
                wf("d.yml", "nixery", "steps: [{name: s, command: a}, {name: s, command: b}]\n"),
                wf("e.yml", "kubernetes", &format!("# {}\n{GOOD}", "x".repeat(workflow::MAX_RAW_BYTES))),
                wf("ok.yml", "docker", GOOD),
            ]),
        );
        let env = KnotEnvelope::parse(&frame.text).expect("env");
        let plans = plan(KNOT, &env.rkey, &env.pipeline().expect("record"), NS).expect("accepted");
        let got: Vec<(String, Option<String>)> = plans
            .iter()
            .map(|p| match p {
                WorkflowPlan::Run(r) => (r.spec.workflow.clone(), None),
                WorkflowPlan::Fail { id, error } => (id.name.clone(), Some(error.clone())),
            })
            .collect();
        assert_eq!(got.len(), 6, "null entry skipped: {got:?}");
        assert_eq!(got[0].1.as_deref(), Some("unknown engine \"podman\""));
        assert!(got[1].1.as_deref().is_some_and(|e| e.starts_with("invalid workflow YAML")), "{got:?}");
        assert!(got[2].1.as_deref().is_some_and(|e| e.contains("needs an image")), "{got:?}");
        assert!(got[3].1.as_deref().is_some_and(|e| e.contains("duplicate step name")), "{got:?}");
        assert!(got[4].1.as_deref().is_some_and(|e| e.contains("limit")), "{got:?}");
        assert_eq!(got[5], ("ok.yml".into(), None));

        // Unknown trigger kind: each workflow fails with Go's text.
        let frame = envelope("3m7aaaaaaab22", "merge", serde_json::json!([wf("ok.yml", "docker", GOOD)]));
        let env = KnotEnvelope::parse(&frame.text).expect("env");
        let plans = plan(KNOT, &env.rkey, &env.pipeline().expect("record"), NS).expect("accepted");
        assert!(
            matches!(&plans[0], WorkflowPlan::Fail { error, .. } if error == "unknown trigger kind: merge")
        );
        // Push without push metadata.
        let frame =
            envelope("3m7aaaaaaac22", "pull_request", serde_json::json!([wf("ok.yml", "docker", GOOD)]));
        let env = KnotEnvelope::parse(&frame.text).expect("env");
        let plans = plan(KNOT, &env.rkey, &env.pipeline().expect("record"), NS).expect("accepted");
        assert!(
            matches!(&plans[0], WorkflowPlan::Fail { error, .. } if error == "pull request trigger metadata is nil")
        );

        // Manual triggers run; the clone fetches the default branch (no commit).
        let frame = envelope("3m7aaaaaaad22", "manual", serde_json::json!([wf("ok.yml", "docker", GOOD)]));
        let env = KnotEnvelope::parse(&frame.text).expect("env");
        let plans = plan(KNOT, &env.rkey, &env.pipeline().expect("record"), NS).expect("accepted");
        let WorkflowPlan::Run(run) = &plans[0] else { panic!("manual runs") };
        assert_eq!(run.spec.trigger.commit(), None);
        assert!(!run.metadata.annotations.as_ref().expect("ann").contains_key("bobbin.dev/commit"));

        // Whole-pipeline drops.
        let record = env.pipeline().expect("record");
        assert!(plan("other.knot", &env.rkey, &record, NS).expect_err("knot").contains("does not match"));
        let no_trigger = PipelineRecord::from_value(serde_json::json!({"workflows": []})).expect("r");
        assert_eq!(plan(KNOT, "r", &no_trigger, NS).expect_err("drop"), "no trigger metadata found");
    }

    #[tokio::test]
    async fn creates_runs_appends_pending_and_dedupes_replays() {
        let dir = tempfile::tempdir().expect("dir");
        let store = registered_store(&dir.path().join("s.db")).await;
        let kube = MockKube::start();
        let intake = intake(&store, &kube);
        let frame = push_frame();
        let handled = intake.handle(KNOT, &frame).await.expect("handle");
        let Handled::Accepted { runs, failed } = handled else { panic!("accepted: {handled:?}") };
        assert_eq!(runs.len(), 2);
        assert!(failed.is_empty());

        let seen = kube.seen();
        assert_eq!(seen.len(), 2);
        for (s, workflow) in seen.iter().zip(["build.yml", "test.yml"]) {
            assert_eq!(s.method, "POST");
            assert!(s.path.starts_with("/apis/bobbin.dev/v1alpha1/namespaces/ci/workflowruns"), "{}", s.path);
            assert_eq!(s.body["kind"], "WorkflowRun");
            assert_eq!(s.body["spec"]["workflow"], workflow);
            assert_eq!(s.body["spec"]["knot"], KNOT);
            assert_eq!(s.body["spec"]["pipelineRkey"], "3m734z2gwll22");
            assert_eq!(s.body["spec"]["trigger"]["kind"], "push");
            assert_eq!(
                s.body["spec"]["trigger"]["push"]["newSha"],
                "356a192b7913b04c54574d18c28d46e6395428ab"
            );
            let name = s.body["metadata"]["name"].as_str().expect("name");
            assert_eq!(s.body["spec"]["secretName"], format!("{name}-secrets"));
        }
        assert_eq!(seen[0].body["spec"]["engine"], "nixery");
        assert_eq!(seen[1].body["spec"]["image"], "golang:1.25-bookworm");

        let uri = "at://did:web:knot1.tangled.sh/sh.tangled.pipeline/3m734z2gwll22";
        assert_eq!(
            statuses(&store).await,
            [
                (uri.into(), "build.yml".into(), StatusKind::Pending, None, None),
                (uri.into(), "test.yml".into(), StatusKind::Pending, None, None)
            ]
        );
        // Cursor: the event's TID time (older than receipt) minus the margin.
        let (tid_us, _) = decode_tid("3m734z2gwll22").expect("tid");
        assert_eq!(store.knot_cursor(KNOT).await.expect("c"), tid_us as i64 * 1000 - 60_000_000_000);
        assert!(store.pipeline_seen(KNOT, "3m734z2gwll22").await.expect("seen"));

        // A replay is recognised and does nothing.
        assert_eq!(intake.handle(KNOT, &push_frame()).await.expect("replay"), Handled::Duplicate);
        assert_eq!(kube.seen().len(), 2);
        assert_eq!(statuses(&store).await.len(), 2);
    }

    #[tokio::test]
    async fn unknown_engine_fails_like_the_fixture_without_pending() {
        let dir = tempfile::tempdir().expect("dir");
        let store = registered_store(&dir.path().join("s.db")).await;
        let kube = MockKube::start();
        let frame = envelope(
            "3m737bbo4pe22",
            "push",
            serde_json::json!([wf("docker-build.yml", "podman", GOOD), wf("ok.yml", "docker", GOOD)]),
        );
        let handled = intake(&store, &kube).handle(KNOT, &frame).await.expect("handle");
        assert!(
            matches!(&handled, Handled::Accepted { runs, failed } if runs.len() == 1 && failed.len() == 1),
            "{handled:?}"
        );
        let events = store.events_after(0, 10).await.expect("events");
        let first: StatusFrame = serde_json::from_str(&events[0].frame).expect("frame");
        let want: StatusFrame =
            serde_json::from_str(fixture("spindle-events/status-unknown-engine.jsonl").trim())
                .expect("fixture");
        assert_eq!(first.event.status, StatusKind::Failed);
        assert_eq!(first.event.error.as_deref(), Some("unknown engine \"podman\""));
        assert_eq!(first.event.exit_code, want.event.exit_code);
        assert_eq!(first.event.pipeline, want.event.pipeline);
        assert_eq!(first.event.workflow, want.event.workflow);
        assert_eq!(statuses(&store).await[1].2, StatusKind::Pending);
        assert_eq!(kube.posted_names().len(), 1);
    }

    #[tokio::test]
    async fn unregistered_repos_foreign_nsids_and_malformed_frames_create_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let store = registered_store(&dir.path().join("s.db")).await;
        let kube = MockKube::start();
        let intake = intake(&store, &kube);
        let frame = Frame { text: "{not json".into(), received_ns: ws_now() };
        assert!(matches!(intake.handle(KNOT, &frame).await.expect("h"), Handled::Malformed(_)));
        assert_eq!(store.knot_cursor(KNOT).await.expect("c"), 0, "no rkey, no cursor move");
        let frame = Frame {
            text: r#"{"event":{},"nsid":"sh.tangled.git.refUpdate","rkey":"3m734z2gwll22"}"#.into(),
            received_ns: ws_now(),
        };
        assert_eq!(
            intake.handle(KNOT, &frame).await.expect("h"),
            Handled::Ignored("sh.tangled.git.refUpdate".into())
        );
        // Wrong source knot.
        assert!(matches!(
            intake.handle("knot2.example", &push_frame()).await.expect("h"),
            Handled::Dropped(_)
        ));
        // Owner no longer a member (B18).
        store.transaction(|tx| q::delete_member(tx, OWNER, "m1")).await.expect("remove");
        let handled = intake.handle(KNOT, &push_frame()).await.expect("h");
        assert!(
            matches!(&handled, Handled::Dropped(why) if why.contains("not registered here")),
            "{handled:?}"
        );
        assert!(kube.seen().is_empty());
        assert!(statuses(&store).await.is_empty());
    }

    #[tokio::test]
    async fn already_existing_runs_count_rejected_ones_fail_and_outages_retry() {
        let dir = tempfile::tempdir().expect("dir");
        let store = registered_store(&dir.path().join("s.db")).await;
        let kube = MockKube::start();
        let intake = intake(&store, &kube);
        // API server down: nothing is marked, the caller retries the same frame.
        kube.fail_next(&[503]);
        let err = intake.handle(KNOT, &push_frame()).await.expect_err("unavailable");
        assert_eq!(err.label(), "kube");
        assert!(!store.pipeline_seen(KNOT, "3m734z2gwll22").await.expect("seen"));
        // Second attempt: the first run is invalid for the API server (422), the second is made.
        kube.fail_next(&[422]);
        let handled = intake.handle(KNOT, &push_frame()).await.expect("retry");
        let Handled::Accepted { runs, failed } = handled else { panic!("accepted") };
        assert_eq!((runs.len(), failed.len()), (1, 1));
        assert!(failed[0].1.starts_with("cannot create WorkflowRun: injected failure"), "{failed:?}");
        let st = statuses(&store).await;
        assert_eq!(
            st.iter().map(|s| (s.1.as_str(), s.2)).collect::<Vec<_>>(),
            [
                ("build.yml", StatusKind::Pending),
                ("build.yml", StatusKind::Failed),
                ("test.yml", StatusKind::Pending)
            ]
        );
        assert_eq!(st[1].4, Some(-1));

        // Another pipeline whose runs already exist (created before a restart): success.
        let pr = pr_frame();
        let first = PipelineIntake::new(store.clone(), Arc::new(kube.api(NS)), NS, OWNER);
        store.transaction(|tx| q::register_repo(tx, &hello_spindle())).await.expect("r");
        let env = KnotEnvelope::parse(&pr.text).expect("env");
        for p in plan(KNOT, &env.rkey, &env.pipeline().expect("rec"), NS).expect("plan") {
            let WorkflowPlan::Run(run) = p else { panic!("runs") };
            RunCreator::create(&kube.api(NS), &run).await.expect("pre-create");
        }
        let handled = first.handle(KNOT, &pr).await.expect("handle");
        assert!(matches!(handled, Handled::Accepted { ref runs, .. } if runs.len() == 2), "{handled:?}");
    }

    /// Crash at each step, restart on the same SQLite file, replay: every workflow ends with
    /// exactly one first status and one WorkflowRun, and the pipeline is marked once.
    #[tokio::test]
    async fn crash_at_every_step_then_restart_loses_and_duplicates_nothing() {
        let points = [
            CrashPoint::AfterStatus(0),
            CrashPoint::AfterCreate(0),
            CrashPoint::AfterStatus(1),
            CrashPoint::AfterCreate(1),
            CrashPoint::AfterStatus(2),
            CrashPoint::BeforeMark,
        ];
        for point in points {
            let dir = tempfile::tempdir().expect("dir");
            let path = dir.path().join("spindle.db");
            let frame = envelope(
                "3m7bbbbbbbb22",
                "push",
                serde_json::json!([
                    wf("a.yml", "docker", GOOD),
                    wf("b.yml", "kubernetes", GOOD),
                    wf("c.yml", "podman", GOOD)
                ]),
            );
            let kube = MockKube::start();
            {
                let store = registered_store(&path).await;
                let crashing = intake(&store, &kube).crash_at(point);
                let err = crashing.handle(KNOT, &frame).await.expect_err("crash");
                assert!(err.to_string().contains("injected crash"), "{point:?}: {err}");
                assert!(!store.pipeline_seen(KNOT, "3m7bbbbbbbb22").await.expect("seen"), "{point:?}");
                // The controller may already have moved the first workflow on, or the member may
                // have left meanwhile: a pipeline whose intake started is still finished.
                if point == CrashPoint::AfterStatus(1) {
                    store.transaction(|tx| q::delete_member(tx, OWNER, "m1")).await.expect("remove member");
                }
                if point == CrashPoint::AfterCreate(0) {
                    let id = WorkflowId::new(KNOT, "3m7bbbbbbbb22", "a.yml");
                    store
                        .append_transition(StatusRecord::new(
                            &id,
                            StatusKind::Running,
                            jiff::Timestamp::now(),
                        ))
                        .await
                        .expect("running");
                }
            }
            // Restart: a new store handle on the same file, a new client to the same cluster.
            let kube = kube.restart();
            let store = Store::open(&path).expect("reopen");
            let restarted = intake(&store, &kube);
            let handled = restarted.handle(KNOT, &frame).await.expect("replay");
            assert!(
                matches!(&handled, Handled::Accepted { runs, failed } if runs.len() == 2 && failed.len() == 1),
                "{point:?}: {handled:?}"
            );
            assert_eq!(restarted.handle(KNOT, &frame).await.expect("again"), Handled::Duplicate, "{point:?}");

            let st = statuses(&store).await;
            let firsts: Vec<(&str, StatusKind)> = st.iter().map(|s| (s.1.as_str(), s.2)).collect();
            let mut want = vec![
                ("a.yml", StatusKind::Pending),
                ("b.yml", StatusKind::Pending),
                ("c.yml", StatusKind::Failed),
            ];
            if point == CrashPoint::AfterCreate(0) {
                want.insert(1, ("a.yml", StatusKind::Running));
            }
            assert_eq!(firsts, want, "{point:?}");
            let mut existing = kube.existing();
            existing.dedup();
            assert_eq!(existing.len(), 2, "{point:?}: one WorkflowRun per runnable workflow");
            assert!(store.pipeline_seen(KNOT, "3m7bbbbbbbb22").await.expect("seen"), "{point:?}");
            assert!(store.knot_cursor(KNOT).await.expect("cursor") > 0, "{point:?}");
        }
    }
}
