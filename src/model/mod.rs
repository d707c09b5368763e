//! tangled's wire model: what knots send, what workflows say, what the spindle reports.
//! Pure data and parsing; no IO.

pub mod ids;
pub mod pipeline;
pub mod status;
pub mod workflow;

pub use ids::WorkflowId;
pub use pipeline::{CloneOptions, KnotEnvelope, PipelineRecord, PipelineWorkflow, TriggerMetadata};
pub use status::{StatusFrame, StatusKind, StatusRecord};
pub use workflow::{Engine, Step, Workflow, WorkflowError};

/// A knot frame or pipeline record that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("malformed {what}: {message}")]
    Json { what: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
}
