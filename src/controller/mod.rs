//! The WorkflowRun controller: reconcile into Tekton PipelineRuns, map their status, queue, cancel, clean up.

/// Finalizer that lets a deleted, unfinished run be cancelled and reported before it goes.
pub const FINALIZER: &str = "bobbin.dev/workflowrun";

pub mod leader;
pub mod metrics;
pub mod queue;
pub mod startup;
pub mod status;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
pub(crate) mod mock;
