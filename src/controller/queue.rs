//! The run queue: at most `max_job_count` PipelineRuns execute at once (spec §5.2, DESIGN
//! "Queueing").
//!
//! The queue lives in the cluster, not in memory (fixing B12/B13): every PipelineRun is created
//! with `spec.status: PipelineRunPending`, and one promoter releases the oldest queued ones (by
//! their WorkflowRun's creation time, then name) whenever slots are free, with a merge patch that
//! clears `spec.status`. A restart loses nothing and `tkn pr list` shows what waits. Only the
//! promoter starts runs, so two reconciles can never both take the last slot.
//!
//! `SPINDLE_SERVER_QUEUE_SIZE` bounds the backlog: a run that arrives when that many wait fails
//! at once with a reason, instead of being dropped silently as Go does (B12).
//!
//! A slot is one workflow (one PipelineRun), not one pipeline as in Go: bobbin runs the workflows
//! of a pipeline independently (B4), so the limit is on what actually uses the cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::tekton::PipelineRun;
use crate::tekton::types::{spec_status, succeeded};

/// Label on everything bobbin creates; the queue only counts these PipelineRuns.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=bobbin";
/// Annotation with the WorkflowRun's creation time (RFC 3339): the queue's order.
pub const QUEUED_AT: &str = "bobbin.dev/queued-at";
/// How often the promoter looks even when nobody kicks it (a missed wake-up costs at most this).
pub const RESYNC: Duration = Duration::from_secs(30);

/// Where a PipelineRun stands with respect to the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Created with `spec.status: PipelineRunPending`, waiting for a slot.
    Queued,
    /// Running (or being cancelled): holds a slot.
    Active,
    /// Finished: holds nothing.
    Done,
}

pub fn slot(pr: &PipelineRun) -> Slot {
    let done = pr
        .status
        .as_ref()
        .and_then(|s| succeeded(&s.conditions))
        .is_some_and(|c| c.status == "True" || c.status == "False");
    if done {
        Slot::Done
    } else if pr.spec.status.as_deref() == Some(spec_status::PENDING) {
        Slot::Queued
    } else {
        Slot::Active
    }
}

/// Queue order: the WorkflowRun's creation time (annotation), else the PipelineRun's, then the name.
fn order_key(pr: &PipelineRun) -> (Option<Timestamp>, String) {
    let queued_at = pr
        .annotations()
        .get(QUEUED_AT)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .or_else(|| pr.meta().creation_timestamp.as_ref().map(|t| t.0));
    let owner = pr
        .owner_references()
        .iter()
        .find(|o| o.kind == "WorkflowRun")
        .map(|o| o.name.clone())
        .unwrap_or_else(|| pr.name_any());
    (queued_at, owner)
}

/// What one pass decides.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// PipelineRuns to start, oldest first.
    pub promote: Vec<String>,
    /// Running after the promotions.
    pub active: usize,
    /// Still waiting after the promotions.
    pub queued: usize,
}

/// Which queued PipelineRuns to start so that at most `max_active` run.
pub fn decide(prs: &[PipelineRun], max_active: usize) -> Decision {
    let active = prs.iter().filter(|p| slot(p) == Slot::Active).count();
    let mut queued: Vec<&PipelineRun> = prs.iter().filter(|p| slot(p) == Slot::Queued).collect();
    queued.sort_by_key(|p| order_key(p));
    let free = max_active.saturating_sub(active);
    let promote: Vec<String> = queued.iter().take(free).map(|p| p.name_any()).collect();
    Decision { active: active + promote.len(), queued: queued.len() - promote.len(), promote }
}

/// One promoter pass: list bobbin's PipelineRuns, start the oldest queued ones that fit.
pub async fn promote(api: &Api<PipelineRun>, max_active: usize) -> Result<Decision, kube::Error> {
    let prs = api.list(&ListParams::default().labels(MANAGED_BY)).await?;
    let decision = decide(&prs.items, max_active);
    let clear = serde_json::json!({ "spec": { "status": null } });
    for name in &decision.promote {
        match api.patch(name, &PatchParams::default(), &Patch::Merge(&clear)).await {
            Ok(_) => tracing::info!(pipeline_run = %name, "started queued PipelineRun"),
            // Deleted meanwhile: its slot was never taken.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(decision)
}

/// Wakes the promoter and tracks the backlog; cheap to clone. Reconcile kicks it when a run is
/// queued or finishes.
#[derive(Debug, Clone, Default)]
pub struct QueueKick {
    wake: Arc<Notify>,
    /// Queued PipelineRuns: set by each promoter pass, counted up by each create in between.
    queued: Arc<AtomicUsize>,
}

impl QueueKick {
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// How many runs wait for a slot (as of the last pass, plus those created since).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// A PipelineRun was just created held.
    pub fn note_queued(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    fn set_queued(&self, n: usize) {
        self.queued.store(n, Ordering::SeqCst);
    }

    async fn wait(&self) {
        self.wake.notified().await;
    }
}

/// Run the promoter until `shutdown`: a pass on every kick and every [`RESYNC`].
pub async fn run_promoter(
    api: Api<PipelineRun>,
    max_active: usize,
    kick: QueueKick,
    metrics: Arc<super::metrics::ControllerMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        match promote(&api, max_active).await {
            Ok(d) => {
                metrics.set_queue(d.active, d.queued);
                kick.set_queued(d.queued);
            }
            Err(e) => tracing::warn!(error = %e, "queue pass failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = kick.wait() => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::mock::{ApiServer, Exchange};
    use crate::tekton::types::{Condition, PipelineRunStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    /// A bobbin PipelineRun of WorkflowRun `owner` created at `at`.
    fn pr(name: &str, owner: &str, at: &str, slot: Slot) -> PipelineRun {
        let mut pr = PipelineRun::new(name, Default::default());
        pr.metadata.namespace = Some(crate::controller::fixtures::NAMESPACE.into());
        pr.metadata.annotations = Some([(QUEUED_AT.to_owned(), at.to_owned())].into());
        pr.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "bobbin.dev/v1alpha1".into(),
            kind: "WorkflowRun".into(),
            name: owner.into(),
            uid: format!("uid-{owner}"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        match slot {
            Slot::Queued => pr.spec.status = Some(spec_status::PENDING.into()),
            Slot::Active => {}
            Slot::Done => {
                pr.status = Some(PipelineRunStatus {
                    conditions: vec![Condition {
                        type_: "Succeeded".into(),
                        status: "True".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
            }
        }
        pr
    }

    #[test]
    fn oldest_workflow_runs_go_first_up_to_the_limit() {
        let prs = vec![
            pr("c", "c", "2026-11-21T12:00:03Z", Slot::Queued),
            pr("a", "a", "2026-11-21T12:00:01Z", Slot::Active),
            pr("b2", "b2", "2026-11-21T12:00:02Z", Slot::Queued),
            pr("b1", "b1", "2026-11-21T12:00:02Z", Slot::Queued),
            pr("old", "old", "2026-11-21T11:00:00Z", Slot::Done),
        ];
        let d = decide(&prs, 3);
        assert_eq!(d.promote, ["b1", "b2"], "same second: by name");
        assert_eq!((d.active, d.queued), (3, 1));
        assert_eq!(decide(&prs, 1).promote, Vec::<String>::new());
        assert_eq!(decide(&prs, 10).promote, ["b1", "b2", "c"]);
    }

    #[tokio::test]
    async fn promotion_clears_spec_status_of_the_oldest_queued_run() {
        let prs = vec![
            pr("wf-new", "wf-new", "2026-11-21T12:00:05Z", Slot::Queued),
            pr("wf-old", "wf-old", "2026-11-21T12:00:01Z", Slot::Queued),
            pr("wf-running", "wf-running", "2026-11-21T12:00:00Z", Slot::Active),
        ];
        let list = serde_json::json!({
            "apiVersion": "tekton.dev/v1", "kind": "PipelineRunList", "metadata": {},
            "items": prs,
        });
        let (client, server) = ApiServer::new(vec![
            Exchange::get(
                "/apis/tekton.dev/v1/namespaces/bobbin-test/pipelineruns?&labelSelector=app.kubernetes.io%2Fmanaged-by%3Dbobbin",
            )
            .respond(200, list),
            Exchange::patch("/apis/tekton.dev/v1/namespaces/bobbin-test/pipelineruns/wf-old?")
                .content_type("application/merge-patch+json")
                .body(serde_json::json!({"spec": {"status": null}}))
                .respond(200, serde_json::to_value(&prs[1]).expect("json")),
        ]);
        let api: Api<PipelineRun> = Api::namespaced(client, "bobbin-test");
        let d = promote(&api, 2).await.expect("pass");
        assert_eq!(d, Decision { promote: vec!["wf-old".into()], active: 2, queued: 1 });
        server.done().await;
    }
}
