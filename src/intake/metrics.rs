//! Intake counters: what each stream did with its frames, how many workflow runs were requested,
//! how often a frame had to be retried and how often a stream reconnected.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `jetstream` or `knot`.
    pub stream: &'static str,
    /// What happened: an outcome, an error label, or a reconnect reason.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkflowLabels {
    /// `created` (a WorkflowRun was requested, or already existed) or `failed` (rejected at intake).
    pub result: &'static str,
}

/// Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct IntakeMetrics {
    pub frames: Family<StreamLabels, Counter>,
    pub retries: Family<StreamLabels, Counter>,
    pub reconnects: Family<StreamLabels, Counter>,
    pub workflows: Family<WorkflowLabels, Counter>,
}

impl IntakeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bobbin_intake_frames",
            "Frames received from Jetstream and knots, by what intake did with them",
            self.frames.clone(),
        );
        registry.register(
            "bobbin_intake_retries",
            "Frames whose handling failed and was retried, by error label",
            self.retries.clone(),
        );
        registry.register(
            "bobbin_intake_reconnects",
            "Stream connections that ended",
            self.reconnects.clone(),
        );
        registry.register(
            "bobbin_intake_workflows",
            "Workflows taken in from pipelines, by result",
            self.workflows.clone(),
        );
    }

    pub(crate) fn frame(&self, stream: &'static str, outcome: &'static str) {
        self.frames.get_or_create(&StreamLabels { stream, outcome }).inc();
    }

    pub(crate) fn retry(&self, stream: &'static str, outcome: &'static str) {
        self.retries.get_or_create(&StreamLabels { stream, outcome }).inc();
    }

    pub(crate) fn reconnect(&self, stream: &'static str, outcome: &'static str) {
        self.reconnects.get_or_create(&StreamLabels { stream, outcome }).inc();
    }

    pub(crate) fn workflow(&self, result: &'static str) {
        self.workflows.get_or_create(&WorkflowLabels { result }).inc();
    }
}
