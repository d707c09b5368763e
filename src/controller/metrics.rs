//! The controller's Prometheus metrics: reconciles, failures by reason, outcomes, durations and
//! the queue.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Debug)]
pub struct ControllerMetrics {
    pub reconciles: Counter,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub runs_finished: Family<StatusLabel, Counter>,
    pub reconcile_seconds: Histogram,
    pub run_seconds: Histogram,
    pub active_runs: Gauge,
    pub queued_runs: Gauge,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        ControllerMetrics {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            runs_finished: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            run_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            active_runs: Gauge::default(),
            queued_runs: Gauge::default(),
        }
    }
}

impl ControllerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("bobbin_reconciles", "WorkflowRun reconciles", self.reconciles.clone());
        registry.register(
            "bobbin_reconcile_errors",
            "Failed reconciles by error label",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "bobbin_runs_finished",
            "Workflow runs finished, by status",
            self.runs_finished.clone(),
        );
        registry.register(
            "bobbin_reconcile_duration_seconds",
            "Time spent in one reconcile",
            self.reconcile_seconds.clone(),
        );
        registry.register(
            "bobbin_run_duration_seconds",
            "Workflow run time from start to completion",
            self.run_seconds.clone(),
        );
        registry.register("bobbin_active_runs", "PipelineRuns holding a slot", self.active_runs.clone());
        registry.register("bobbin_queued_runs", "PipelineRuns waiting for a slot", self.queued_runs.clone());
    }

    pub fn error(&self, label: &str) {
        self.reconcile_errors.get_or_create(&ReasonLabel { reason: label.to_owned() }).inc();
    }

    pub fn finished(&self, status: crate::model::StatusKind, took: Option<Duration>) {
        self.runs_finished.get_or_create(&StatusLabel { status: status.as_str().to_owned() }).inc();
        if let Some(d) = took {
            self.run_seconds.observe(d.as_secs_f64());
        }
    }

    pub fn set_queue(&self, active: usize, queued: usize) {
        self.active_runs.set(active as i64);
        self.queued_runs.set(queued as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let m = ControllerMetrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        m.error("kube");
        m.finished(crate::model::StatusKind::Failed, Some(Duration::from_secs(3)));
        m.set_queue(2, 5);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("bobbin_reconcile_errors_total{reason=\"kube\"} 1"), "{text}");
        assert!(text.contains("bobbin_runs_finished_total{status=\"failed\"} 1"), "{text}");
        assert!(text.contains("bobbin_queued_runs 5"), "{text}");
    }
}
