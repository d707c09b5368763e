//! Intake: Jetstream records and knot event streams become registered repos and WorkflowRuns.
//!
//! - [`jetstream`]: one WebSocket to Jetstream; member, repo and collaborator records from the
//!   owner and members are applied in order by [`ingest`]; the cursor is the `time_us` of the last
//!   processed event.
//! - [`knot`]: one WebSocket per knot; `sh.tangled.pipeline` events go to [`pipeline`], which
//!   validates them and creates one `WorkflowRun` per workflow (or a `failed` status).
//!
//! Both streams share [`ws`]: connect with a timeout, ping every 30 s, reconnect when no frame
//! arrived for the read deadline, jittered exponential backoff, and a bounded channel between the
//! socket reader and the processor, so a slow processor stops the reader instead of losing events.

pub mod atproto_source;
pub mod ingest;
pub mod jetstream;
pub mod knot;
pub mod metrics;
pub mod pipeline;
pub mod ws;

#[cfg(test)]
mod testkit;

pub use atproto_source::AtprotoCollaborators;
pub use ingest::{CollaboratorPage, CollaboratorRecord, CollaboratorSource, Ingester};
pub use jetstream::Jetstream;
pub use knot::{KnotConsumer, KnotSources};
pub use metrics::IntakeMetrics;
pub use pipeline::{PipelineIntake, RunCreator};

use crate::store::StoreError;

/// An intake failure. The label is stable for metrics.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Kubernetes API could not take a WorkflowRun now; the event is retried.
    #[error("cannot create WorkflowRun {name}: {message}")]
    Kube { name: String, message: String },
    /// The owner's PDS could not list collaborator records.
    #[error("cannot list collaborators of {owner}: {message}")]
    Collaborators { owner: String, message: String },
    /// A stream endpoint URL that cannot be used.
    #[error("invalid stream URL {url:?}: {message}")]
    Url { url: String, message: String },
}

impl IntakeError {
    pub fn label(&self) -> &'static str {
        match self {
            IntakeError::Store(_) => "store",
            IntakeError::Kube { .. } => "kube",
            IntakeError::Collaborators { .. } => "collaborators",
            IntakeError::Url { .. } => "url",
        }
    }
}

pub type Result<T, E = IntakeError> = std::result::Result<T, E>;
