//! Pure status mapping: Tekton objects in, `WorkflowRun.status` and tangled statuses out.
//!
//! Nothing here talks to a server, so every rule is a unit test away. The reconciler feeds it the
//! latest PipelineRun, the TaskRuns and Pods Tekton made for it, the newest status already reported
//! to tangled (read back from the store), the clock and the fail-fast grace period.
//!
//! Decisions (DESIGN.md "Status mapping"; spec §5.3, §11):
//! - `running` is reported as soon as Tekton starts the PipelineRun (Succeeded `Unknown` with any
//!   reason but `PipelineRunPending`) or any TaskRun exists. That is the closest match to Go, which
//!   emits `running` before pulling the image; the workflow deadline (`timeouts.pipeline`) starts
//!   at the same moment.
//! - A final status after a run that started is always preceded by `running`, so the appview sees
//!   Go's `pending → running → final` even when the controller only looks once the run is over.
//!   Statuses never go backwards, and nothing follows a final status.
//! - Any deadline expiry is `timeout` without `error`/`exitCode` (fixing B19); a failed step is
//!   `failed`/`workflow failed` (or `oom killed`) with its real exit code (fixing B27).
//! - Image-pull errors, unschedulable pods and quota refusals fail the run with a specific message
//!   once they have lasted `fail_fast_grace` (an invalid image name at once), and the PipelineRun is
//!   then cancelled so it does not sit until its timeout.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::crd::{StepPhase, StepState, WorkflowRun, WorkflowRunStatus};
use crate::model::{StatusKind, StatusRecord};
use crate::plan::{Plan, PlannedStep};
use crate::tekton::types::{
    Condition, LABEL_PIPELINE_RUN, LABEL_PIPELINE_TASK, StepState as TektonStep, spec_status, succeeded,
};
use crate::tekton::{PipelineRun, TaskRun};

/// Go's error text for a step that exited non-zero.
pub const WORKFLOW_FAILED: &str = "workflow failed";
/// Go's error text for a step whose container was OOM-killed.
pub const OOM_KILLED: &str = "oom killed";

/// PipelineRun `Succeeded=False` reasons that mean someone stopped the run.
const CANCEL_REASONS: &[&str] =
    &["Cancelled", "CancelledRunFinally", "StoppedRunFinally", "PipelineRunCancelled"];
/// Reasons (PipelineRun, TaskRun or step) that mean a deadline expired.
const TIMEOUT_REASONS: &[&str] = &["PipelineRunTimeout", "TaskRunTimeout", "TimeoutExceeded"];
/// Step termination reasons that are not the step's own doing.
const STOPPED_STEP_REASONS: &[&str] = &["Skipped", "TaskRunCancelled", "TimeoutExceeded", "Cancelled"];
/// Container waiting reasons that mean the image will not come.
const IMAGE_REASONS: &[&str] = &["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"];
/// ... and of those, the ones no retry can fix.
const PERMANENT_IMAGE_REASONS: &[&str] = &["InvalidImageName", "ErrImageNeverPull"];
/// Container waiting reasons that mean the container cannot be created.
const CONTAINER_REASONS: &[&str] = &["CreateContainerConfigError", "CreateContainerError"];
/// TaskRun `Succeeded=Unknown` reasons Tekton uses while it cannot create or place the pod.
const TASKRUN_REFUSAL_REASONS: &[&str] =
    &["ExceededResourceQuota", "ExceededNodeResources", "CreateContainerConfigError", "PodCreationFailed"];

/// Everything the mapping looks at.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub run: &'a WorkflowRun,
    pub plan: &'a Plan,
    pub pipeline_run: Option<&'a PipelineRun>,
    pub task_runs: &'a [TaskRun],
    pub pods: &'a [Pod],
    /// The newest status tangled already has for this workflow (from the store).
    pub last_reported: Option<StatusKind>,
    pub now: Timestamp,
    pub fail_fast_grace: Duration,
}

/// What the mapping decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub status: WorkflowRunStatus,
    /// Tangled statuses to append, in order (each through `append_transition`).
    pub records: Vec<StatusRecord>,
    /// The PipelineRun must be stopped: bobbin decided the outcome before Tekton did.
    pub cancel_pipeline_run: bool,
    /// Look again after this long even without a watch event (a grace period running out).
    pub recheck_after: Option<Duration>,
}

/// A run's outcome as tangled sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub phase: StatusKind,
    /// The `error` of a `failed` status.
    pub error: Option<String>,
    pub exit_code: Option<i64>,
    /// Extra detail for `kubectl describe` (never sent to tangled).
    pub message: Option<String>,
}

impl Verdict {
    pub fn new(phase: StatusKind) -> Self {
        Verdict { phase, error: None, exit_code: None, message: None }
    }

    /// `failed` with Go's `error`/`exitCode` pair.
    pub fn failed(error: impl Into<String>, exit_code: i64) -> Self {
        let error = error.into();
        Verdict {
            phase: StatusKind::Failed,
            message: Some(error.clone()),
            error: Some(error),
            exit_code: Some(exit_code),
        }
    }

    fn with_message(mut self, message: Option<String>) -> Self {
        self.message = message;
        self
    }
}

/// Map the observed Tekton state to the run's status and the statuses to report.
pub fn map(obs: &Observation<'_>) -> Mapped {
    let current = obs.run.status.clone().unwrap_or_default();
    if let Some(phase) = current.phase.filter(|p| p.is_final()) {
        // The verdict is written once and never revised (steps still going were marked then).
        return settled(obs.run, &current, phase, obs.last_reported, obs.now);
    }
    let Some(pr) = obs.pipeline_run else {
        // Not created yet: the reconciler creates it; nothing changes meanwhile.
        let verdict = Verdict::new(StatusKind::Pending);
        let status = build_status(obs.run, &current, &verdict, None, Vec::new(), false, obs.now);
        let records = records_for(obs.run, obs.last_reported, &verdict, false, obs.now);
        return Mapped { status, records, cancel_pipeline_run: false, recheck_after: None };
    };

    let task_runs: Vec<&TaskRun> = obs.task_runs.iter().filter(|tr| belongs_to(tr, pr)).collect();
    let pr_name = pr.name_any();
    let pods: Vec<&Pod> = obs
        .pods
        .iter()
        .filter(|p| p.labels().get(LABEL_PIPELINE_RUN).is_some_and(|n| *n == pr_name))
        .collect();
    let pr_status = pr.status.clone().unwrap_or_default();
    let condition = succeeded(&pr_status.conditions);
    let done = condition.is_some_and(|c| c.status != "Unknown");
    let steps = step_states(obs.plan, pr, &task_runs, done);
    let queued = pr.spec.status.as_deref() == Some(spec_status::PENDING)
        || condition.is_some_and(|c| c.reason.as_deref() == Some(spec_status::PENDING));
    let started = !task_runs.is_empty()
        || steps.iter().any(|s| s.state.phase != StepPhase::Waiting)
        || (!queued && condition.is_some());

    let mut cancel_pipeline_run = false;
    let mut recheck_after = None;
    let verdict = match condition {
        Some(c) if c.status == "True" => Verdict::new(StatusKind::Success),
        Some(c) if c.status == "False" => finished_verdict(c, &task_runs, &steps),
        _ => match setup_problem(&task_runs, &pods) {
            Some(problem) => {
                let elapsed = problem
                    .since
                    .map(|since| obs.now.duration_since(since).unsigned_abs())
                    .unwrap_or(Duration::ZERO);
                if problem.permanent || elapsed >= obs.fail_fast_grace {
                    cancel_pipeline_run = true;
                    Verdict::failed(problem.error, -1)
                } else {
                    recheck_after = Some(obs.fail_fast_grace - elapsed);
                    Verdict::new(if started { StatusKind::Running } else { StatusKind::Pending })
                        .with_message(Some(format!("waiting: {}", problem.error)))
                }
            }
            None if started => Verdict::new(StatusKind::Running),
            None if queued => {
                Verdict::new(StatusKind::Pending).with_message(Some("queued: waiting for a free slot".into()))
            }
            None => Verdict::new(StatusKind::Pending),
        },
    };
    let mut logged = logged_states(steps);
    if verdict.phase.is_final() {
        stop_unfinished(&mut logged);
    }
    let mut status = build_status(obs.run, &current, &verdict, Some(pr), logged, started, obs.now);
    if verdict.phase.is_final() && status.completion_time.is_none() {
        status.completion_time = Some(Time(obs.now));
    }
    let records = records_for(obs.run, obs.last_reported, &verdict, started, obs.now);
    Mapped { status, records, cancel_pipeline_run, recheck_after }
}

/// A final status decided without Tekton's say (untranslatable run, PipelineRun deleted, cancelled
/// before it was created): the new status and what to report.
pub fn conclude(
    run: &WorkflowRun,
    verdict: Verdict,
    last_reported: Option<StatusKind>,
    now: Timestamp,
) -> Mapped {
    let current = run.status.clone().unwrap_or_default();
    if let Some(phase) = current.phase.filter(|p| p.is_final()) {
        return settled(run, &current, phase, last_reported, now);
    }
    let started = current.start_time.is_some();
    let mut status = build_status(run, &current, &verdict, None, current.steps.clone(), started, now);
    status.pipeline_run_name = current.pipeline_run_name.clone();
    if verdict.phase.is_final() {
        status.completion_time = current.completion_time.clone().or(Some(Time(now)));
        stop_unfinished(&mut status.steps);
    }
    let records = records_for(run, last_reported, &verdict, started, now);
    Mapped { status, records, cancel_pipeline_run: false, recheck_after: None }
}

/// A run whose final status is already written: keep it, and only catch tangled up if a previous
/// attempt stopped between writing the status and reporting it.
fn settled(
    run: &WorkflowRun,
    current: &WorkflowRunStatus,
    phase: StatusKind,
    last_reported: Option<StatusKind>,
    now: Timestamp,
) -> Mapped {
    let verdict = Verdict {
        phase,
        error: if phase == StatusKind::Failed { current.message.clone() } else { None },
        exit_code: if phase == StatusKind::Failed { current.exit_code } else { None },
        message: current.message.clone(),
    };
    let records = records_for(run, last_reported, &verdict, current.start_time.is_some(), now);
    Mapped { status: current.clone(), records, cancel_pipeline_run: false, recheck_after: None }
}

fn logged_states(steps: Vec<ObservedStep<'_>>) -> Vec<StepState> {
    steps.into_iter().filter(|s| s.step.log_id.is_some()).map(|s| s.state).collect()
}

/// Once the run is over nothing is still going: a running step was stopped, a waiting one never ran.
fn stop_unfinished(steps: &mut [StepState]) {
    for step in steps {
        match step.phase {
            StepPhase::Running => step.phase = StepPhase::Failed,
            StepPhase::Waiting => step.phase = StepPhase::Skipped,
            _ => {}
        }
    }
}

fn rank(kind: StatusKind) -> u8 {
    match kind {
        StatusKind::Pending => 0,
        StatusKind::Running => 1,
        _ => 2,
    }
}

/// The statuses that take tangled from `last` to `verdict`, in order: `pending` for a run nobody
/// reported yet, `running` once it started, then the final one. Never backwards, never after a
/// final status.
pub fn records_for(
    run: &WorkflowRun,
    last: Option<StatusKind>,
    verdict: &Verdict,
    started: bool,
    now: Timestamp,
) -> Vec<StatusRecord> {
    let id = run.workflow_id();
    let last_rank = last.map(rank);
    if last_rank == Some(2) || last_rank.is_some_and(|r| r >= rank(verdict.phase)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let target = verdict.phase;
    if last.is_none() && (target == StatusKind::Pending || started) {
        out.push(StatusRecord::new(&id, StatusKind::Pending, now));
    }
    if (target == StatusKind::Running || (target.is_final() && started)) && last_rank.is_none_or(|r| r < 1) {
        out.push(StatusRecord::new(&id, StatusKind::Running, now));
    }
    if target.is_final() {
        let mut record = StatusRecord::new(&id, target, now);
        if target == StatusKind::Failed {
            record = record.with_error(
                verdict.error.clone().unwrap_or_else(|| WORKFLOW_FAILED.to_owned()),
                verdict.exit_code.unwrap_or(-1),
            );
        }
        out.push(record);
    }
    out
}

fn build_status(
    run: &WorkflowRun,
    current: &WorkflowRunStatus,
    verdict: &Verdict,
    pr: Option<&PipelineRun>,
    steps: Vec<StepState>,
    started: bool,
    now: Timestamp,
) -> WorkflowRunStatus {
    let pr_status = pr.and_then(|p| p.status.as_ref());
    let start_time = current.start_time.clone().or_else(|| {
        started.then(|| {
            pr_status
                .and_then(|s| s.start_time.clone())
                .or_else(|| earliest_start(&steps))
                .unwrap_or(Time(now))
        })
    });
    WorkflowRunStatus {
        phase: Some(verdict.phase),
        message: verdict.message.clone(),
        exit_code: if verdict.phase == StatusKind::Failed { verdict.exit_code } else { None },
        pipeline_run_name: pr.map(|p| p.name_any()).or_else(|| current.pipeline_run_name.clone()),
        commit: run.spec.trigger.commit().map(|c| c.chars().take(7).collect()),
        start_time,
        completion_time: if verdict.phase.is_final() {
            pr_status.and_then(|s| s.completion_time.clone()).or_else(|| current.completion_time.clone())
        } else {
            None
        },
        steps,
        observed_generation: run.metadata.generation,
    }
}

fn earliest_start(steps: &[StepState]) -> Option<Time> {
    steps.iter().filter_map(|s| s.start_time.clone()).min_by_key(|t| t.0)
}

/// Is this TaskRun one of `pr`'s children (by label, or listed in `childReferences`)?
fn belongs_to(tr: &TaskRun, pr: &PipelineRun) -> bool {
    let name = tr.name_any();
    tr.labels().get(LABEL_PIPELINE_RUN).is_some_and(|l| *l == pr.name_any())
        || pr.status.as_ref().is_some_and(|s| s.child_references.iter().any(|c| c.name == name))
}

/// The pipeline task a TaskRun runs: its `tekton.dev/pipelineTask` label, else the PipelineRun's
/// `childReferences` entry for it.
fn pipeline_task_of<'a>(tr: &'a TaskRun, pr: &'a PipelineRun) -> Option<&'a str> {
    if let Some(task) = tr.labels().get(LABEL_PIPELINE_TASK) {
        return Some(task.as_str());
    }
    let name = tr.metadata.name.as_deref()?;
    pr.status
        .as_ref()?
        .child_references
        .iter()
        .find(|c| c.name == name)
        .map(|c| c.pipeline_task_name.as_str())
}

/// One planned step with its observed state.
#[derive(Debug, Clone)]
struct ObservedStep<'p> {
    step: &'p PlannedStep,
    state: StepState,
    oom: bool,
    /// The step ran out of time (a step-level timeout).
    timed_out: bool,
}

fn step_states<'p>(
    plan: &'p Plan,
    pr: &PipelineRun,
    task_runs: &[&TaskRun],
    done: bool,
) -> Vec<ObservedStep<'p>> {
    let mut out: Vec<ObservedStep<'p>> = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        let previous_ok = out.last().is_none_or(|p| p.state.phase == StepPhase::Succeeded);
        let per_step = task_runs.iter().find(|tr| pipeline_task_of(tr, pr) == Some(step.task.as_str()));
        let observed = if let Some(tr) = per_step {
            from_task_run(step, tr)
        } else if let Some((tekton_step, siblings_before_done)) = packed_step(task_runs, &step.task) {
            from_packed_step(step, tekton_step, siblings_before_done, previous_ok)
        } else {
            ObservedStep {
                step,
                state: blank(step, if done { StepPhase::Skipped } else { StepPhase::Waiting }),
                oom: false,
                timed_out: false,
            }
        };
        out.push(observed);
    }
    out
}

fn blank(step: &PlannedStep, phase: StepPhase) -> StepState {
    StepState {
        name: step.name.clone(),
        kind: step.kind,
        phase,
        start_time: None,
        finish_time: None,
        exit_code: None,
    }
}

fn is_oom(step: &TektonStep) -> bool {
    step.termination_reason.as_deref() == Some("OOMKilled")
        || step.terminated.as_ref().is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
}

/// A real exit of the step's own command (not a cancellation or skip by Tekton).
fn own_exit(step: &TektonStep) -> Option<i64> {
    let t = step.terminated.as_ref()?;
    let stopped = step.termination_reason.as_deref().is_some_and(|r| STOPPED_STEP_REASONS.contains(&r))
        || t.reason.as_deref().is_some_and(|r| STOPPED_STEP_REASONS.contains(&r));
    (!stopped).then_some(i64::from(t.exit_code))
}

fn started_at(step: &TektonStep) -> Option<Time> {
    step.terminated
        .as_ref()
        .and_then(|t| t.started_at.clone())
        .or_else(|| step.running.as_ref().and_then(|r| r.started_at.clone()))
}

/// Per-step layout: the whole TaskRun is the step.
fn from_task_run<'p>(step: &'p PlannedStep, tr: &TaskRun) -> ObservedStep<'p> {
    let status = tr.status.clone().unwrap_or_default();
    let cond = succeeded(&status.conditions);
    let tekton_steps = &status.steps;
    let failing = tekton_steps.iter().find(|s| own_exit(s).is_some_and(|c| c != 0));
    let last_exit = tekton_steps.iter().rev().find_map(own_exit);
    let any_started = tekton_steps.iter().any(|s| s.running.is_some() || s.terminated.is_some());
    let phase = match cond.map(|c| c.status.as_str()) {
        Some("True") => StepPhase::Succeeded,
        Some("False") => StepPhase::Failed,
        _ if any_started => StepPhase::Running,
        _ => StepPhase::Waiting,
    };
    let finish_time = if matches!(phase, StepPhase::Succeeded | StepPhase::Failed) {
        status.completion_time.clone().or_else(|| {
            tekton_steps.iter().filter_map(|s| s.terminated.as_ref()?.finished_at.clone()).max_by_key(|t| t.0)
        })
    } else {
        None
    };
    let start_time = tekton_steps
        .iter()
        .filter_map(started_at)
        .min_by_key(|t| t.0)
        .or_else(|| if any_started { status.start_time.clone() } else { None });
    let exit_code = match phase {
        StepPhase::Failed => failing.and_then(own_exit),
        StepPhase::Succeeded => last_exit,
        _ => None,
    };
    let timed_out = cond.and_then(|c| c.reason.as_deref()).is_some_and(|r| TIMEOUT_REASONS.contains(&r));
    ObservedStep {
        step,
        state: StepState {
            name: step.name.clone(),
            kind: step.kind,
            phase,
            start_time,
            finish_time,
            exit_code,
        },
        oom: failing.is_some_and(is_oom) || tekton_steps.iter().any(is_oom),
        timed_out,
    }
}

/// Packed layout: the Tekton step named like the plan task, and whether every Tekton step before
/// it in its TaskRun has finished (containers of a packed pod all "run" at once; Tekton's
/// entrypoint makes each wait for the one before).
fn packed_step<'a>(task_runs: &[&'a TaskRun], name: &str) -> Option<(&'a TektonStep, bool)> {
    for tr in task_runs {
        let steps = &tr.status.as_ref()?.steps;
        if let Some(i) = steps.iter().position(|s| s.name == name) {
            let before_done = steps[..i].iter().all(|s| s.terminated.is_some());
            return Some((&steps[i], before_done));
        }
    }
    None
}

fn from_packed_step<'p>(
    step: &'p PlannedStep,
    tekton: &TektonStep,
    before_done: bool,
    previous_ok: bool,
) -> ObservedStep<'p> {
    let reason = tekton.termination_reason.as_deref();
    let phase = match &tekton.terminated {
        Some(_) if reason == Some("Skipped") || !previous_ok => StepPhase::Skipped,
        Some(t) if t.exit_code == 0 && own_exit(tekton).is_some() => StepPhase::Succeeded,
        Some(_) => StepPhase::Failed,
        None if tekton.running.is_some() && before_done && previous_ok => StepPhase::Running,
        None => StepPhase::Waiting,
    };
    let start_time = match phase {
        StepPhase::Running | StepPhase::Succeeded | StepPhase::Failed => started_at(tekton),
        _ => None,
    };
    let finish_time = match phase {
        StepPhase::Succeeded | StepPhase::Failed => {
            tekton.terminated.as_ref().and_then(|t| t.finished_at.clone())
        }
        _ => None,
    };
    let exit_code = match phase {
        StepPhase::Succeeded | StepPhase::Failed => own_exit(tekton),
        _ => None,
    };
    ObservedStep {
        step,
        state: StepState {
            name: step.name.clone(),
            kind: step.kind,
            phase,
            start_time,
            finish_time,
            exit_code,
        },
        oom: is_oom(tekton),
        timed_out: reason.is_some_and(|r| TIMEOUT_REASONS.contains(&r)),
    }
}

/// The outcome of a PipelineRun that Tekton finished with `Succeeded=False`.
fn finished_verdict(c: &Condition, task_runs: &[&TaskRun], steps: &[ObservedStep<'_>]) -> Verdict {
    let reason = c.reason.as_deref().unwrap_or("");
    let message = c.message.clone();
    if CANCEL_REASONS.contains(&reason) {
        return Verdict::new(StatusKind::Cancelled).with_message(message);
    }
    let task_timed_out = task_runs.iter().any(|tr| {
        tr.status
            .as_ref()
            .and_then(|s| succeeded(&s.conditions))
            .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some("TaskRunTimeout"))
    });
    if TIMEOUT_REASONS.contains(&reason) || task_timed_out || steps.iter().any(|s| s.timed_out) {
        return Verdict::new(StatusKind::Timeout).with_message(message);
    }
    let failing = steps
        .iter()
        .find(|s| s.state.phase == StepPhase::Failed && s.state.exit_code.is_some_and(|c| c != 0));
    match failing {
        Some(s) if s.oom => Verdict::failed(OOM_KILLED, s.state.exit_code.unwrap_or(-1)),
        Some(s) => Verdict::failed(WORKFLOW_FAILED, s.state.exit_code.unwrap_or(-1)),
        None if steps.iter().any(|s| s.oom) => Verdict::failed(OOM_KILLED, -1),
        None => {
            if let Some(error) = task_failure(task_runs) {
                return Verdict::failed(error, -1);
            }
            let text = match (reason, message.as_deref()) {
                ("" | "Failed", Some(m)) => m.to_owned(),
                (r, Some(m)) => format!("{r}: {m}"),
                ("", None) => WORKFLOW_FAILED.to_owned(),
                (r, None) => r.to_owned(),
            };
            Verdict::failed(text, -1)
        }
    }
}

/// The `error` for a TaskRun that Tekton failed before any step could exit (its own setup
/// failures, such as `TaskRunImagePullFailed`), in the Go spindle's words where it has them.
fn task_failure(task_runs: &[&TaskRun]) -> Option<String> {
    task_runs.iter().find_map(|tr| {
        let c = succeeded(&tr.status.as_ref()?.conditions)?;
        let reason = c.reason.as_deref().unwrap_or("");
        if c.status != "False" || matches!(reason, "" | "Failed" | "StepFailed" | "TaskRunCancelled") {
            return None;
        }
        let detail = c.message.clone().unwrap_or_else(|| reason.to_owned());
        Some(match reason {
            "TaskRunImagePullFailed" => format!("pulling image: {detail}"),
            r if CONTAINER_REASONS.contains(&r) => format!("creating container: {detail}"),
            r if TASKRUN_REFUSAL_REASONS.contains(&r) => format!("creating pod: {detail}"),
            r => format!("{r}: {detail}"),
        })
    })
}

/// Something keeping the run from ever starting a step.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetupProblem {
    /// The `error` of the `failed` status it becomes.
    error: String,
    /// When it was first seen (for the grace period); `None` counts from now.
    since: Option<Timestamp>,
    /// No retry can fix it: fail at once.
    permanent: bool,
}

fn setup_problem(task_runs: &[&TaskRun], pods: &[&Pod]) -> Option<SetupProblem> {
    for tr in task_runs {
        let Some(c) = tr.status.as_ref().and_then(|s| succeeded(&s.conditions)) else { continue };
        let reason = c.reason.as_deref().unwrap_or("");
        if c.status == "Unknown" && TASKRUN_REFUSAL_REASONS.contains(&reason) {
            let detail = c.message.clone().unwrap_or_else(|| reason.to_owned());
            return Some(SetupProblem {
                error: format!("creating pod: {detail}"),
                since: c.last_transition_time.as_ref().map(|t| t.0).or(creation(&tr.metadata)),
                permanent: false,
            });
        }
    }
    for pod in pods {
        let Some(status) = &pod.status else { continue };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        for c in status.conditions.iter().flatten() {
            if c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
            {
                return Some(SetupProblem {
                    error: format!(
                        "scheduling pod: {}",
                        c.message.clone().unwrap_or_else(|| "no node can run it".into())
                    ),
                    since: c.last_transition_time.as_ref().map(|t| t.0).or(creation(&pod.metadata)),
                    permanent: false,
                });
            }
        }
        let since = status.start_time.as_ref().map(|t| t.0).or(creation(&pod.metadata));
        let containers =
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
        if let Some(problem) = containers.filter_map(|c| container_problem(c, since)).next() {
            return Some(problem);
        }
    }
    None
}

fn container_problem(c: &ContainerStatus, since: Option<Timestamp>) -> Option<SetupProblem> {
    let waiting = c.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    let detail = waiting.message.clone().unwrap_or_else(|| reason.to_owned());
    if IMAGE_REASONS.contains(&reason) {
        Some(SetupProblem {
            error: format!("pulling image: {} {}: {detail}", reason, c.image),
            since,
            permanent: PERMANENT_IMAGE_REASONS.contains(&reason),
        })
    } else if CONTAINER_REASONS.contains(&reason) {
        Some(SetupProblem { error: format!("creating container: {detail}"), since, permanent: false })
    } else {
        None
    }
}

fn creation(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Timestamp> {
    meta.creation_timestamp.as_ref().map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{ClusterState, Recorded, already_reported, reported, watch_sequence};
    use crate::crd::StepKind;
    use crate::store::Store;

    /// What tangled saw: (status, error, exitCode) per appended event.
    type Seen = Vec<(StatusKind, Option<String>, Option<i64>)>;

    const GRACE: Duration = Duration::from_secs(120);

    /// Replay a recorded scenario through the mapping and a real store file, reopening the store
    /// (and losing the last WorkflowRun status write) before event `restart_at`.
    async fn replay(
        scenario: &str,
        run: WorkflowRun,
        restart_at: Option<usize>,
    ) -> (Seen, WorkflowRunStatus) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spindle.db");
        let mut store = Store::open(&path).expect("open");
        let id = run.workflow_id();
        // Intake reported `pending` when it created the WorkflowRun.
        already_reported(&store, &run, &[StatusKind::Pending]).await;

        let events = watch_sequence(scenario);
        let created = events
            .iter()
            .find_map(|e| match &e.object {
                Recorded::PipelineRun(pr) => pr.metadata.creation_timestamp.clone(),
                _ => None,
            })
            .expect("a PipelineRun")
            .0;
        let plan = run.plan();
        let mut run = run;
        let mut previous_status = run.status.clone();
        let mut cluster = ClusterState::default();
        for (i, event) in events.iter().enumerate() {
            cluster.apply(event);
            if restart_at == Some(i) {
                drop(store);
                store = Store::open(&path).expect("reopen");
                // The crash also lost the last status write: the cluster has the one before.
                run.status = previous_status.clone();
            }
            let last = store.latest_status(&id).await.expect("latest").map(|r| r.status);
            let task_runs = cluster.task_runs();
            let pods = cluster.pods();
            let now = created + jiff::SignedDuration::from_secs_f64(event.t);
            let mapped = map(&Observation {
                run: &run,
                plan: &plan,
                pipeline_run: cluster.pipeline_run.as_ref(),
                task_runs: &task_runs,
                pods: &pods,
                last_reported: last,
                now,
                fail_fast_grace: GRACE,
            });
            assert!(!mapped.cancel_pipeline_run, "{scenario}: nothing to fail fast at event {i}");
            for record in mapped.records {
                store.append_transition(record).await.expect("append");
            }
            previous_status = run.status.clone();
            run.status = Some(mapped.status);
        }
        (reported(&store).await, run.status.expect("status"))
    }

    fn phases(status: &WorkflowRunStatus) -> Vec<(&str, StepKind, StepPhase, Option<i64>)> {
        status.steps.iter().map(|s| (s.name.as_str(), s.kind, s.phase, s.exit_code)).collect()
    }

    /// Every scenario, replayed straight and with a restart before each event in turn.
    async fn check(scenario: &str, run: WorkflowRun, want: &Seen, check_status: impl Fn(&WorkflowRunStatus)) {
        let n = watch_sequence(scenario).len();
        let (seen, status) = replay(scenario, run.clone(), None).await;
        assert_eq!(&seen, want, "{scenario}");
        check_status(&status);
        for restart_at in (1..n).step_by(7).chain([n - 1]) {
            let (seen, status) = replay(scenario, run.clone(), Some(restart_at)).await;
            assert_eq!(&seen, want, "{scenario} with a restart before event {restart_at}");
            check_status(&status);
        }
    }

    use StatusKind::*;

    #[tokio::test]
    async fn per_step_success() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "test"]);
        check("per-step-success", run, &ran_then(Success), |s| {
            assert_eq!(s.phase, Some(Success));
            assert_eq!(s.exit_code, None);
            assert!(s.start_time.is_some() && s.completion_time.is_some());
            assert_eq!(
                phases(s),
                [
                    (crate::plan::CLONE_STEP_NAME, StepKind::System, StepPhase::Succeeded, Some(0)),
                    ("build", StepKind::User, StepPhase::Succeeded, Some(0)),
                    ("test", StepKind::User, StepPhase::Succeeded, Some(0)),
                ]
            );
            assert!(s.steps.iter().all(|st| st.start_time.is_some() && st.finish_time.is_some()));
        })
        .await;
    }

    /// What tangled sees of a run that ran and ended `last`, with no error or exit code.
    fn ran_then(last: StatusKind) -> Seen {
        vec![(Pending, None, None), (Running, None, None), (last, None, None)]
    }

    /// What tangled sees when `boom` of build, boom, never exits with `code`.
    fn boom_failed(code: i64) -> Seen {
        vec![(Pending, None, None), (Running, None, None), (Failed, Some(WORKFLOW_FAILED.into()), Some(code))]
    }

    /// The steps after `boom` exited with `code`: build ran, never was skipped.
    fn boom_failed_steps(code: i64) -> [(&'static str, StepKind, StepPhase, Option<i64>); 4] {
        [
            (crate::plan::CLONE_STEP_NAME, StepKind::System, StepPhase::Succeeded, Some(0)),
            ("build", StepKind::User, StepPhase::Succeeded, Some(0)),
            ("boom", StepKind::User, StepPhase::Failed, Some(code)),
            ("never", StepKind::User, StepPhase::Skipped, None),
        ]
    }

    #[tokio::test]
    async fn per_step_fail_reports_the_real_exit_code_and_skips_the_rest() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "boom", "never"]);
        check("per-step-fail", run, &boom_failed(3), |s| {
            assert_eq!(
                (s.phase, s.exit_code, s.message.as_deref()),
                (Some(Failed), Some(3), Some(WORKFLOW_FAILED))
            );
            assert_eq!(phases(s), boom_failed_steps(3));
        })
        .await;
    }

    #[tokio::test]
    async fn per_step_timeout_is_timeout_without_error() {
        let run = WorkflowRun::test("wf").with_steps(&["slow"]);
        check("per-step-timeout", run, &ran_then(Timeout), |s| {
            assert_eq!((s.phase, s.exit_code), (Some(Timeout), None));
            assert_eq!(phases(s)[1], ("slow", StepKind::User, StepPhase::Failed, None));
        })
        .await;
    }

    #[tokio::test]
    async fn per_step_cancel_is_cancelled() {
        let run = WorkflowRun::test("wf").with_steps(&["slow"]);
        check("per-step-cancel", run, &ran_then(Cancelled), |s| {
            assert_eq!((s.phase, s.exit_code), (Some(Cancelled), None));
            assert_eq!(phases(s)[0].2, StepPhase::Succeeded);
        })
        .await;
    }

    #[tokio::test]
    async fn per_step_pending_waits_then_runs() {
        let run = WorkflowRun::test("wf").with_steps(&["quick"]);
        check("per-step-pending", run, &ran_then(Success), |s| {
            assert_eq!(s.phase, Some(Success));
        })
        .await;
    }

    #[tokio::test]
    async fn packed_fail_reads_tekton_steps() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "boom", "never"]);
        check("packed-fail", run, &boom_failed(4), |s| {
            assert_eq!(phases(s), boom_failed_steps(4));
        })
        .await;
    }

    /// The state after the first `n` events of a scenario.
    fn state_after(scenario: &str, n: usize) -> ClusterState {
        let mut state = ClusterState::default();
        for e in watch_sequence(scenario).iter().take(n) {
            state.apply(e);
        }
        state
    }

    fn map_state(
        run: &WorkflowRun,
        state: &ClusterState,
        last: Option<StatusKind>,
        now: Timestamp,
    ) -> Mapped {
        let plan = run.plan();
        let (task_runs, pods) = (state.task_runs(), state.pods());
        map(&Observation {
            run,
            plan: &plan,
            pipeline_run: state.pipeline_run.as_ref(),
            task_runs: &task_runs,
            pods: &pods,
            last_reported: last,
            now,
            fail_fast_grace: GRACE,
        })
    }

    #[test]
    fn queued_pipeline_run_stays_pending_and_says_so() {
        let run = WorkflowRun::test("wf").with_steps(&["quick"]);
        let state = state_after("per-step-pending", 1);
        let m = map_state(&run, &state, Some(Pending), Timestamp::now());
        assert_eq!(m.status.phase, Some(Pending));
        assert!(m.records.is_empty());
        assert_eq!(m.status.message.as_deref(), Some("queued: waiting for a free slot"));
        assert!(m.status.steps.iter().all(|s| s.phase == StepPhase::Waiting));
    }

    #[test]
    fn a_run_nobody_reported_starts_with_pending() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "test"]);
        let all = watch_sequence("per-step-success").len();
        let m = map_state(&run, &state_after("per-step-success", all), None, Timestamp::now());
        let kinds: Vec<_> = m.records.iter().map(|r| r.status).collect();
        assert_eq!(kinds, [Pending, Running, Success]);
        assert!(m.records.iter().all(|r| r.workflow == "test.yml"));
    }

    /// The TaskRun of user step `step` in a recorded state.
    fn task_run_of<'a>(state: &'a mut ClusterState, step: &str) -> &'a mut crate::tekton::TaskRun {
        state
            .task_runs
            .values_mut()
            .find(|t| t.metadata.name.as_deref().is_some_and(|n| n.ends_with(step)))
            .expect("the step's TaskRun")
    }

    /// Find the first pod of a scenario and make its step container wait with `reason`.
    fn with_waiting_container(state: &mut ClusterState, reason: &str) {
        let pod = state
            .pods
            .values_mut()
            .find(|p| p.metadata.name.as_deref().is_some_and(|n| n.ends_with("-pod")))
            .expect("a step pod");
        let status = pod.status.get_or_insert_with(Default::default);
        status.phase = Some("Pending".into());
        let containers = status.container_statuses.get_or_insert_with(Vec::new);
        for c in containers.iter_mut() {
            c.state = Some(k8s_openapi::api::core::v1::ContainerState {
                waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(format!("Back-off pulling image {:?}", c.image)),
                }),
                ..Default::default()
            });
        }
        status.start_time = Some(Time("2026-11-21T12:00:00Z".parse().expect("ts")));
    }

    #[test]
    fn image_pull_errors_fail_after_the_grace_period() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "test"]);
        let mut state = state_after("per-step-success", 8);
        with_waiting_container(&mut state, "ImagePullBackOff");
        let start: Timestamp = "2026-11-21T12:00:00Z".parse().expect("ts");

        let early = map_state(&run, &state, Some(Pending), start + jiff::SignedDuration::from_secs(30));
        assert_eq!(early.status.phase, Some(Running));
        assert_eq!(early.recheck_after, Some(Duration::from_secs(90)));
        assert!(!early.cancel_pipeline_run);

        let late = map_state(&run, &state, Some(Running), start + jiff::SignedDuration::from_secs(121));
        assert_eq!(late.status.phase, Some(Failed));
        assert!(late.cancel_pipeline_run);
        let rec = late.records.last().expect("failed record");
        assert_eq!(rec.status, Failed);
        assert_eq!(rec.exit_code, Some(-1));
        assert!(
            rec.error.as_deref().is_some_and(|e| e.starts_with("pulling image: ImagePullBackOff")),
            "{rec:?}"
        );
    }

    #[test]
    fn invalid_image_names_fail_at_once() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "test"]);
        let mut state = state_after("per-step-success", 8);
        with_waiting_container(&mut state, "InvalidImageName");
        let m = map_state(&run, &state, Some(Pending), "2026-11-21T12:00:01Z".parse().expect("ts"));
        assert_eq!(m.status.phase, Some(Failed));
        assert!(m.cancel_pipeline_run);
    }

    #[test]
    fn unschedulable_pods_and_quota_refusals_fail_fast() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "test"]);
        let mut state = state_after("per-step-success", 8);
        let pod = state.pods.values_mut().next().expect("pod");
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient cpu.".into()),
                last_transition_time: Some(Time("2026-11-21T12:00:00Z".parse().expect("ts"))),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let m = map_state(&run, &state, Some(Running), "2026-11-21T12:05:00Z".parse().expect("ts"));
        assert_eq!(
            m.status.message.as_deref(),
            Some("scheduling pod: 0/3 nodes are available: 3 Insufficient cpu.")
        );

        let mut state = state_after("per-step-success", 8);
        state.pods.clear();
        let tr = state.task_runs.values_mut().next().expect("taskrun");
        tr.status.get_or_insert_with(Default::default).conditions = vec![Condition {
            type_: "Succeeded".into(),
            status: "Unknown".into(),
            reason: Some("ExceededResourceQuota".into()),
            message: Some("exceeded quota: compute".into()),
            last_transition_time: Some(Time("2026-11-21T12:00:00Z".parse().expect("ts"))),
        }];
        let m = map_state(&run, &state, Some(Running), "2026-11-21T12:05:00Z".parse().expect("ts"));
        assert_eq!(
            m.records.last().and_then(|r| r.error.as_deref()),
            Some("creating pod: exceeded quota: compute")
        );
    }

    #[test]
    fn oom_and_step_timeouts_and_between_step_deadlines() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "boom", "never"]);
        let all = watch_sequence("per-step-fail").len();
        let mut state = state_after("per-step-fail", all);
        let boom = task_run_of(&mut state, "boom");
        let step = &mut boom.status.as_mut().expect("status").steps[0];
        step.termination_reason = Some("OOMKilled".into());
        step.terminated.as_mut().expect("terminated").exit_code = 137;
        let m = map_state(&run, &state, Some(Running), Timestamp::now());
        assert_eq!((m.status.message.as_deref(), m.status.exit_code), (Some(OOM_KILLED), Some(137)));

        // B19: a deadline between steps (no step running) is still `timeout`.
        let mut state = state_after("per-step-fail", all);
        let pr = state.pipeline_run.as_mut().expect("pr");
        let cond = &mut pr.status.as_mut().expect("status").conditions[0];
        cond.reason = Some("PipelineRunTimeout".into());
        state.task_runs.retain(|n, _| !n.ends_with("boom"));
        let m = map_state(&run, &state, Some(Running), Timestamp::now());
        assert_eq!((m.status.phase, m.status.exit_code), (Some(Timeout), None));
        assert_eq!(m.records.last().map(|r| (r.status, r.error.clone())), Some((Timeout, None)));
    }

    #[test]
    fn a_task_run_tekton_failed_before_any_step_names_the_reason() {
        let run = WorkflowRun::test("wf").with_steps(&["build", "boom", "never"]);
        let all = watch_sequence("per-step-fail").len();
        let mut state = state_after("per-step-fail", all);
        let boom = task_run_of(&mut state, "boom");
        let status = boom.status.as_mut().expect("status");
        status.steps.clear();
        status.conditions[0].reason = Some("TaskRunImagePullFailed".into());
        status.conditions[0].message =
            Some("the step \"run\" in TaskRun failed to pull the image \"nope:1\"".into());
        let m = map_state(&run, &state, Some(Running), Timestamp::now());
        assert_eq!(
            m.records.last().map(|r| (r.status, r.error.clone(), r.exit_code)),
            Some((
                Failed,
                Some("pulling image: the step \"run\" in TaskRun failed to pull the image \"nope:1\"".into()),
                Some(-1)
            ))
        );
    }

    #[test]
    fn final_statuses_stick_and_are_caught_up_once() {
        let run = WorkflowRun::test("wf").with_steps(&["build"]).with_status(WorkflowRunStatus {
            phase: Some(Failed),
            message: Some(WORKFLOW_FAILED.into()),
            exit_code: Some(2),
            start_time: Some(Time(Timestamp::now())),
            ..Default::default()
        });
        let state = state_after("per-step-success", 10);
        let m = map_state(&run, &state, Some(Pending), Timestamp::now());
        let before = run.status.clone().expect("status");
        assert_eq!(
            (m.status.phase, m.status.message.as_deref(), m.status.exit_code, &m.status.start_time),
            (before.phase, before.message.as_deref(), before.exit_code, &before.start_time)
        );
        assert!(!m.cancel_pipeline_run);
        let kinds: Vec<_> = m.records.iter().map(|r| (r.status, r.exit_code)).collect();
        assert_eq!(kinds, [(Running, None), (Failed, Some(2))]);
        assert!(map_state(&run, &state, Some(Failed), Timestamp::now()).records.is_empty());
    }

    #[test]
    fn conclude_without_a_pipeline_run() {
        let run = WorkflowRun::test("wf").with_steps(&["build"]);
        let m = conclude(
            &run,
            Verdict::failed("engine \"docker\" needs an image: set spec.image", -1),
            None,
            Timestamp::now(),
        );
        let kinds: Vec<_> = m.records.iter().map(|r| r.status).collect();
        assert_eq!(kinds, [Failed], "a run that never started fails without an earlier state");
        assert_eq!(m.status.phase, Some(Failed));
        assert!(m.status.completion_time.is_some());
        let m = conclude(&run, Verdict::new(Cancelled), Some(Pending), Timestamp::now());
        assert_eq!(m.records.iter().map(|r| r.status).collect::<Vec<_>>(), [Cancelled]);
    }
}
