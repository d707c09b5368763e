//! TTL cleanup: a finished WorkflowRun is deleted `run_ttl` after it completed, and Kubernetes'
//! garbage collector takes everything it owns with it (the PipelineRun and through it the
//! TaskRuns, pods and workspace PVC, and the per-run Secret). Log files are bobbin's, not the
//! cluster's, and stay.
//!
//! The reconciler requeues finished runs for their expiry, and every run is reconciled once at
//! startup, so a restart never forgets one.

use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, DeleteParams};

use crate::crd::WorkflowRun;

/// What the TTL says about a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Not finished (or no completion time): nothing to do.
    NotFinished,
    /// Delete it now.
    Expired,
    /// Look again after this long.
    After(Duration),
}

/// Pure: where `run` stands with respect to `ttl` at `now`.
pub fn ttl_state(run: &WorkflowRun, ttl: Duration, now: Timestamp) -> Ttl {
    let Some(status) = &run.status else { return Ttl::NotFinished };
    if !status.phase.is_some_and(|p| p.is_final()) {
        return Ttl::NotFinished;
    }
    let Some(done) = &status.completion_time else { return Ttl::NotFinished };
    let age = now.duration_since(done.0);
    let ttl = jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX);
    if age >= ttl { Ttl::Expired } else { Ttl::After((ttl - age).unsigned_abs()) }
}

/// Delete a WorkflowRun, letting the garbage collector remove its dependents in the background.
/// Already gone is fine.
pub async fn delete_run(api: &Api<WorkflowRun>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WorkflowRunStatus;
    use crate::model::StatusKind;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn finished_at(at: &str) -> WorkflowRun {
        WorkflowRun::test("wf").with_status(WorkflowRunStatus {
            phase: Some(StatusKind::Success),
            completion_time: Some(Time(at.parse().expect("ts"))),
            ..Default::default()
        })
    }

    #[test]
    fn expiry() {
        let now: Timestamp = "2026-11-22T12:00:00Z".parse().expect("ts");
        let day = Duration::from_secs(86_400);
        assert_eq!(ttl_state(&finished_at("2026-11-21T11:59:59Z"), day, now), Ttl::Expired);
        assert_eq!(
            ttl_state(&finished_at("2026-11-22T11:00:00Z"), day, now),
            Ttl::After(Duration::from_secs(82_800))
        );
        assert_eq!(
            ttl_state(&WorkflowRun::test("wf").with_phase(StatusKind::Running), day, now),
            Ttl::NotFinished
        );
    }
}
